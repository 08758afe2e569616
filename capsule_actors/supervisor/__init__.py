"""The supervisor process: store, sockets, routing, and the actors it spawns and restarts."""

from .core import Supervisor

__all__ = ["Supervisor"]
