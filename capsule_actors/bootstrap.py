"""Where a process's submits go: resolved once, where the process starts, and handed down.

The places a process starts decide, and nothing deeper reads the environment:

- the CLI and ``app.start()`` bind the App they run to their state directory
  (``App.bind(ClientConfig)``);
- an actor, on this host or on a worker node, configures its whole process: every App in it
  reaches the supervisor that spawned the actor (``configure_process``);
- any other process resolves it at its first submit from the App's ``state_dir``, else the
  environment (``from_environment``): ``CAPSULE_CONNECT`` + ``CAPSULE_KEYS`` for a supervisor on
  another host, else ``CAPSULE_STATE_DIR``, else ``./.capsule``.

The store the supervisor keeps its tasks in is resolved the same way, where the supervisor (or
a board) starts: ``--store``, else ``App(store=)``, else ``CAPSULE_STORE``, else SQLite in the
state directory (``store_url``).

A plain app process (not an actor, no ``CAPSULE_CONNECT``) whose App's store (``App(store=)``,
else ``CAPSULE_STORE``) is a PostgreSQL URL, and for whose state directory no supervisor runs
(no live ``supervisor.json``), submits straight into that store: its App gets a store-only
client (``store_client.py``) instead of a supervisor's (``store_only``). A cluster's members
(``capsule-actors run … --name``) claim those tasks from the store's pool; a supervisor that is
no member runs them at its next start. ``App.client()`` decides this when it first needs a
client, and keeps the answer until that client closes; ``app.start()`` and a supervisor
started meanwhile are found at that point, not later.

This module is the only reader of those variables.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import ConfigError, StateDirError
from .transport import RemoteEndpoint, read_runtime_file

STATE_DIR_ENV = "CAPSULE_STATE_DIR"
CONNECT_ENV = "CAPSULE_CONNECT"
KEYS_ENV = "CAPSULE_KEYS"
STORE_ENV = "CAPSULE_STORE"
DEFAULT_STATE_DIR = ".capsule"


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """One supervisor to talk to: on this host through its state directory, or over TCP."""

    state_dir: Path  # the local supervisor's state directory (its sockets and submit journals)
    remote: RemoteEndpoint | None = None  # a supervisor on another host (tcp + CURVE)

    @property
    def where(self) -> str:
        """How the supervisor is named in errors."""
        return self.remote.address if self.remote is not None else str(self.state_dir)


def resolve_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Explicit value, else $CAPSULE_STATE_DIR, else ./.capsule -- made absolute."""
    chosen = state_dir if state_dir is not None else os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().absolute()


def remote_from_environment() -> RemoteEndpoint | None:
    """``CAPSULE_CONNECT=tcp://H:P`` with ``CAPSULE_KEYS=DIR`` (or a NAME.key_secret file)."""
    address = os.environ.get(CONNECT_ENV)
    if not address:
        return None
    keys = os.environ.get(KEYS_ENV)
    if not keys:
        raise StateDirError(f"{CONNECT_ENV}={address} needs {KEYS_ENV}=DIR with the keys from `capsule-actors keys`")
    return RemoteEndpoint.with_keys(address, Path(keys))


def from_environment(state_dir: str | os.PathLike[str] | None = None) -> ClientConfig:
    """A plain client's configuration: a remote supervisor named by the environment, else the
    state directory ``state_dir`` (an App's), else the environment's, else ./.capsule."""
    return ClientConfig(resolve_state_dir(state_dir), remote_from_environment())


_process_config: ClientConfig | None = None  # set where an actor process starts


def configure_process(config: ClientConfig) -> None:
    """An actor process: every App in it (the registry, and any App its tasks import) reaches
    the supervisor that spawned it."""
    global _process_config
    _process_config = config


def process_config() -> ClientConfig | None:
    return _process_config


def check_store(store: str | os.PathLike[str] | None) -> str | None:
    """A store option as given: None (SQLite in the state directory), a path to an SQLite file,
    or a ``postgresql://`` URL; ConfigError names anything else."""
    if store is None:
        return None
    if isinstance(store, os.PathLike):
        return str(Path(store).expanduser().absolute())
    if not isinstance(store, str) or not store:
        raise ConfigError(
            f"store={store!r}: expected None (SQLite in the state directory), a path to an SQLite file, "
            "or postgresql://USER@HOST:PORT/DB"
        )
    if "://" in store and not store.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"store={store!r}: only postgresql:// URLs (or an SQLite file path) are supported")
    return store if "://" in store else str(Path(store).expanduser().absolute())


def store_url(explicit: str | None, app_store: str | None) -> str | None:
    """The store a supervisor or board opens: ``--store``, else the App's, else $CAPSULE_STORE,
    else None (SQLite in the state directory)."""
    return check_store(explicit) or app_store or check_store(os.environ.get(STORE_ENV) or None)


def store_only(config: ClientConfig, app_store: str | None) -> str | None:
    """The PostgreSQL store a plain app process submits straight into (the module's docstring
    says when), or None: it talks to a supervisor."""
    if config.remote is not None or _process_config is not None:
        return None
    url = app_store or check_store(os.environ.get(STORE_ENV) or None)
    if url is None or not url.startswith(("postgresql://", "postgres://")):
        return None
    return url if read_runtime_file(config.state_dir) is None else None
