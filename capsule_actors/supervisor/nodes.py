"""The supervisor's side of the worker nodes that joined it (the node's side: ``node.py``).

A node brings actor slots named ``NODE:w0…`` and ``NODE:p0…``; they join the worker and process
pools (and so the lock-key owners) while the node is connected, and leave them when it goes.
``NodeTable`` (``node_table.py``) alone keeps the connected nodes; ``NodeLink`` speaks the node
protocol (hello and refusals, pings and leases, spawns and exits, leaving, loss); the actors
themselves are supervised like the supervisor's own (``Children``).
"""

from __future__ import annotations

import logging
import re
import signal
import time
from typing import TYPE_CHECKING, Any

from .. import messages
from ..app import App
from ..errors import ProtocolError
from ..transport import NODE_NAME_PATTERN, NODE_PREFIX
from .node_table import NodeTable, RemoteNode
from .specs import ROLE_PROCESS, ROLE_WORKER, WORKER_CONCURRENCY, ChildSpec

if TYPE_CHECKING:
    from .children import Children
    from .cluster import Membership
    from .keys import KeyRouting
    from .outbox import Frames
    from .tasks import TaskTable
    from .timers import Timers

log = logging.getLogger("capsule_actors.supervisor")

NODE_LEASE = 3.0  # a node's actors run at most this long past the send time of an answered ping
NODE_LOSS = 5.0  # a node silent this long is lost; longer than the lease, so its actors are fenced
NODE_CHECK = 0.25  # how often node silence is checked
MAX_NODE_ACTORS = 256  # per role


def node_specs(
    name: str, workers: int, process_workers: int, concurrency: int, grace: float, max_tasks: int = 0
) -> list[ChildSpec]:
    specs = [ChildSpec(f"{name}:w{i}", ROLE_WORKER, concurrency, grace, node=name) for i in range(workers)]
    return specs + [
        ChildSpec(f"{name}:p{i}", ROLE_PROCESS, 1, grace, node=name, max_tasks=max_tasks)
        for i in range(process_workers)
    ]


def other_version(node: str, theirs: str) -> str:
    return f"node {node} speaks {theirs} of the actor protocol; {messages.version_hint()}"


def refusal(msg: messages.NodeHello, app: App) -> str | None:
    """Why this node cannot join (its version, name, app or sizes), or None when it can."""
    if msg.protocol != messages.PROTOCOL:
        return other_version(repr(msg.name), f"protocol {msg.protocol}")
    if not re.fullmatch(NODE_NAME_PATTERN, msg.name):
        return f"node name {msg.name!r} is not valid: use letters, digits, '_', '.', '-'"
    if msg.app != app.name:
        return f"node {msg.name!r} runs app {msg.app!r}; this supervisor runs {app.name!r}"
    ours, theirs = set(app.tasks), set(msg.tasks)
    if ours != theirs:
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        return (
            f"node {msg.name!r} has a different version of app {app.name!r}: tasks missing on the "
            f"node {missing}, tasks unknown to the supervisor {extra}; deploy the same code to both"
        )
    for what, n in (("workers", msg.workers), ("process_workers", msg.process_workers)):
        if not 0 <= n <= MAX_NODE_ACTORS:
            return f"node {msg.name!r}: {what}={n} is out of range 0-{MAX_NODE_ACTORS}"
    if not msg.workers + msg.process_workers:
        return f"node {msg.name!r} brings no actors (workers=0, process_workers=0)"
    return None


def clean_rss(rss: dict[str, Any]) -> dict[str, int | None]:
    """A NodePing's RSS map, keeping only well-formed entries (the header check is shallow)."""
    return {k: v for k, v in rss.items() if isinstance(k, str) and (v is None or type(v) is int)}


class NodeLink:
    """The node protocol: joins, pings and leases, spawns and exits, leaving, loss."""

    def __init__(
        self,
        app: App,
        grace: float,
        nodes: NodeTable,
        children: Children,
        keys: KeyRouting,
        tasks: TaskTable,
        timers: Timers,
        membership: Membership | None = None,
    ) -> None:
        self._app = app
        self._membership = membership  # a cluster member answers pings only within its own lease
        self._grace = grace
        self._nodes = nodes
        self._children = children
        self._keys = keys
        self._tasks = tasks
        self._timers = timers

    def _on_ping(self, node: RemoteNode, ident: bytes, msg: messages.NodePing) -> None:
        """Answered with a lease; a cluster member leases its nodes only while its own lease has
        NODE_LEASE left, so that their actors stop before another member may take its tasks over."""
        node.rss = clean_rss(msg.rss)
        member = self._membership
        if member is None or member.deadline - time.monotonic() >= NODE_LEASE:
            self._nodes.send(ident, messages.Lease(msg.seq))

    def stop(self) -> None:
        """The supervisor stops: nodes fence their actors now instead of when their lease ends."""
        for node in self._nodes:
            self._nodes.send(node.identity, messages.NodeRefused("the supervisor stopped", False))

    def on_message(self, frames: Frames, key: str) -> None:
        """A message of a worker node; ``key`` is the name its CURVE key was made for."""
        ident, raw = frames[0], frames[1] if len(frames) > 1 else b""
        try:
            msg = messages.decode(raw)
        except ProtocolError as exc:
            if messages.op_code(raw) != messages.NodeHello.OP:
                raise
            # a hello we cannot read: most likely a node of another version, so say why it cannot join
            name = ident[len(NODE_PREFIX) :].split(b"/")[0].decode(errors="replace")
            why = other_version(repr(name), f"another version ({exc})")
            log.warning("refused a worker node: %s", why)
            self._nodes.send(ident, messages.NodeRefused(why, True))
            return
        if isinstance(msg, messages.NodeHello):
            self._on_hello(ident, msg, key)
            return
        node = self._nodes.by_identity(ident)
        if node is None:  # e.g. an incarnation from before our restart: it fences and joins again
            self._nodes.send(ident, messages.NodeRefused("unknown node incarnation; say hello again", False))
            return
        node.last_seen = time.monotonic()
        if isinstance(msg, messages.NodePing):
            self._on_ping(node, ident, msg)
            return
        proc = self._children.get(getattr(msg, "slot", ""))
        if proc is not None and (proc.spec.node != node.name or proc.gen != getattr(msg, "gen", -1)):
            proc = None  # an incarnation we already buried, or not this node's
        if isinstance(msg, messages.Spawned):
            if proc is not None:
                proc.pid = msg.pid
        elif isinstance(msg, messages.Exited):
            if proc is not None:
                self._children.exited(proc, msg.code)
        elif isinstance(msg, messages.NodeBye):
            self._on_bye(node, msg.grace)
        else:
            raise ProtocolError(f"{type(msg).__name__} is not a node message")

    def _on_hello(self, ident: bytes, msg: messages.NodeHello, key: str) -> None:
        known = self._nodes.by_identity(ident)
        if known is not None:  # a resent hello: answer it again
            self._nodes.send(ident, messages.NodeWelcome(self._config(known)))
            return
        why = refusal(msg, self._app)
        if why is None and key != msg.name:  # a key is a node's identity: revoking it revokes the node
            why = (
                f"node {msg.name!r} presented the key made for {key!r}: a key is bound to the name it was made "
                f"for; start the node with --name {key}, or give it a key of its own (`capsule-actors keys DIR "
                f"--add {msg.name}`)"
            )
        old = self._nodes.get(msg.name)
        if why is None and old is not None:
            if (old.host, old.pid) != (msg.host, msg.pid):
                why = (
                    f"a node named {msg.name!r} is already connected (host {old.host}, pid {old.pid}); "
                    "give each node its own --name"
                )
            else:  # the same node, fenced and back: its old actors are dead
                self.lose(old, f"the loss of node {msg.name} (it rejoined as a new incarnation)")
        if why is None and self._children.stopping:
            self._nodes.send(ident, messages.NodeRefused("the supervisor is stopping", False))
            return
        if why is not None:
            log.warning("refused worker node %r from %s: %s", msg.name, msg.host, why)
            self._nodes.send(ident, messages.NodeRefused(why, True))
            return
        specs = node_specs(
            msg.name,
            msg.workers,
            msg.process_workers,
            WORKER_CONCURRENCY,
            self._grace,
            self._app.max_tasks_per_process or 0,
        )
        node = RemoteNode(msg.name, ident, msg.host, msg.pid, specs)
        self._nodes.add(node)
        for spec in specs:
            self._children.add_slot(spec)
            self._tasks.add_slot(spec.slot)
        log.info(
            "worker node %s joined from %s (pid %d): %d workers, %d process workers",
            msg.name,
            msg.host,
            msg.pid,
            msg.workers,
            msg.process_workers,
        )
        self._nodes.send(ident, messages.NodeWelcome(self._config(node)))
        for spec in specs:
            self._children.start_actor(spec)
        self._keys.pools_changed()

    @staticmethod
    def _config(node: RemoteNode) -> dict[str, Any]:
        return {"lease": NODE_LEASE, "slots": [s.slot for s in node.specs]}

    def _on_bye(self, node: RemoteNode, grace: float) -> None:
        """The node is stopping: its actors take no new work, finish theirs, then it is forgotten."""
        if node.leaving:
            return
        log.info("worker node %s is leaving; its actors finish their tasks", node.name)
        node.leaving = True
        children = self._children
        for spec in node.specs:
            proc = children.get(spec.slot)
            if proc is not None:
                children.stop_actor(proc, min(grace, self._grace))
        if not any(children.get(s.slot) for s in node.specs):
            self._forget(node)
        self._keys.pools_changed()

    def revoke(self, name: str) -> None:
        """Its key was removed (SIGHUP): the node is told (it exits), its messages are dropped from
        now on, so its lease runs out and it is declared lost like a node that went silent."""
        node = self._nodes.get(name)
        if node is not None:
            log.error("the key of worker node %s was revoked: it is refused, and fenced when its lease ends", name)
            self._nodes.send(node.identity, messages.NodeRefused(f"the key of node {name!r} was revoked", True))

    def check(self) -> None:
        """Timer: a node silent for NODE_LOSS is lost."""
        now = time.monotonic()
        for node in self._nodes:
            if now - node.last_seen > NODE_LOSS:
                self.lose(node, f"the loss of node {node.name} (nothing heard for {now - node.last_seen:.1f} s)")
        self._timers.add(NODE_CHECK, self.check)

    def lose(self, node: RemoteNode, cause: str) -> None:
        """Its lease ran out (it fenced its actors): their attempts end with WorkerCrashed and are
        retried on live slots; its keys move to the remaining owners."""
        log.error("%s: its tasks are retried elsewhere", cause)
        self._forget(node)
        for spec in node.specs:
            proc = self._children.get(spec.slot)
            if proc is not None:
                self._children.exited(proc, -signal.SIGKILL, cause)
        self._keys.pools_changed()

    def _forget(self, node: RemoteNode) -> None:
        self._nodes.forget(node)
        self._children.forget_node_slots(node.specs)
