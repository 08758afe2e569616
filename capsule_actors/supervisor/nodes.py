"""The supervisor's record of the worker nodes that joined it (the node's side: ``node.py``).

A node brings actor slots named ``NODE:w0…`` and ``NODE:p0…``; they join the worker and process
pools (and so the lock-key owners) while the node is connected, and leave them when it goes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from .. import messages
from ..app import App
from ..transport import NODE_NAME_PATTERN
from .children import ROLE_PROCESS, ROLE_WORKER, ChildSpec

NODE_LEASE = 3.0  # a node's actors run at most this long past the send time of an answered ping
NODE_LOSS = 5.0  # a node silent this long is lost; longer than the lease, so its actors are fenced
NODE_CHECK = 0.25  # how often node silence is checked
MAX_NODE_ACTORS = 256  # per role


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

    def status(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "pid": self.pid,
                "state": "leaving" if self.leaving else "connected", "joined_at": self.joined_at,
                "last_seen_ago": round(now - self.last_seen, 3), "slots": [s.slot for s in self.specs]}


def node_specs(name: str, workers: int, process_workers: int, concurrency: int, grace: float) -> list[ChildSpec]:
    specs = [ChildSpec(f"{name}:w{i}", ROLE_WORKER, concurrency, grace, node=name) for i in range(workers)]
    return specs + [ChildSpec(f"{name}:p{i}", ROLE_PROCESS, 1, grace, node=name) for i in range(process_workers)]


def refusal(msg: messages.NodeHello, app: App) -> str | None:
    """Why this node cannot join (its name, app or sizes), or None when it can."""
    if not re.fullmatch(NODE_NAME_PATTERN, msg.name):
        return f"node name {msg.name!r} is not valid: use letters, digits, '_', '.', '-'"
    if msg.app != app.name:
        return f"node {msg.name!r} runs app {msg.app!r}; this supervisor runs {app.name!r}"
    ours, theirs = set(app.tasks), set(msg.tasks)
    if ours != theirs:
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        return (f"node {msg.name!r} has a different version of app {app.name!r}: tasks missing on the "
                f"node {missing}, tasks unknown to the supervisor {extra}; deploy the same code to both")
    for what, n in (("workers", msg.workers), ("process_workers", msg.process_workers)):
        if not 0 <= n <= MAX_NODE_ACTORS:
            return f"node {msg.name!r}: {what}={n} is out of range 0-{MAX_NODE_ACTORS}"
    if not msg.workers + msg.process_workers:
        return f"node {msg.name!r} brings no actors (workers=0, process_workers=0)"
    return None


def clean_rss(rss: dict[str, Any]) -> dict[str, int | None]:
    """A NodePing's RSS map, keeping only well-formed entries (the header check is shallow)."""
    return {k: v for k, v in rss.items() if isinstance(k, str) and (v is None or type(v) is int)}
