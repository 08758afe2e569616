"""The worker nodes connected to the supervisor: ``NodeTable`` alone keeps them (the protocol
they speak is ``nodes.py``'s ``NodeLink``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import messages
from .specs import ChildSpec

if TYPE_CHECKING:
    from .outbox import Outbox


@dataclasses.dataclass(eq=False)
class RemoteNode:
    """One connected incarnation of a worker node."""

    name: str
    identity: bytes
    host: str
    pid: int
    specs: list[ChildSpec]
    joined_at: float = dataclasses.field(default_factory=time.time)
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    rss: dict[str, int | None] = dataclasses.field(default_factory=dict)
    leaving: bool = False  # said NodeBye: its actors finish what they run, then it is forgotten

    def status(self, now: float) -> messages.NodeStatus:
        return messages.NodeStatus(
            self.name,
            self.host,
            self.pid,
            "leaving" if self.leaving else "connected",
            self.joined_at,
            round(now - self.last_seen, 3),
            [s.slot for s in self.specs],
        )


class NodeTable:
    """The connected worker nodes, by their routing id on the supervisor's TCP socket."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._nodes: dict[bytes, RemoteNode] = {}

    def __iter__(self) -> Iterator[RemoteNode]:
        return iter(list(self._nodes.values()))

    def add(self, node: RemoteNode) -> None:
        self._nodes[node.identity] = node

    def forget(self, node: RemoteNode) -> None:
        self._nodes.pop(node.identity, None)

    def by_identity(self, ident: bytes) -> RemoteNode | None:
        return self._nodes.get(ident)

    def get(self, name: str) -> RemoteNode | None:
        for node in self._nodes.values():
            if node.name == name:
                return node
        return None

    def specs(self) -> list[ChildSpec]:
        return [spec for node in self._nodes.values() for spec in node.specs]

    def leaving(self, name: str) -> bool:
        """Leaving, or gone: its slots are out of the pools."""
        node = self.get(name)
        return node is None or node.leaving

    def status(self, now: float) -> list[messages.NodeStatus]:
        return [node.status(now) for node in self._nodes.values()]

    def send(self, ident: bytes, msg: messages.Message) -> None:
        self._outbox.to_node(ident, msg)
