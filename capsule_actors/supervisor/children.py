"""The actor processes the supervisor owns (OTP-shaped): the fork template, spawns, exits and
restarts by restart type and intensity, heartbeats, recycling, and the stop protocol.

``Children`` alone writes the table of live incarnations (``procs``) and the record of every slot.
An actor's death is reported to the ``on_exit`` callback it was given (the supervisor settles the
actor's attempts and admissions there) before the slot is restarted.
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from .. import messages
from ..lifecycle import exit_cause
from ..transport import pid_alive
from .specs import ROLE_PROCESS, ActorProcess, ChildSpec, RestartIntensity, SlotRecord, local_rss, signal_pid
from .template import ActorTemplate

if TYPE_CHECKING:
    from ..app import App
    from .node_table import NodeTable
    from .outbox import Outbox
    from .timers import Timers

log = logging.getLogger("capsule_actors.supervisor")

HEARTBEAT_TIMEOUT = 15.0  # an actor silent this long is hung: kill and restart it
HEARTBEAT_CHECK = 1.0
SPAWN_TIMEOUT = 30.0  # a node's actor that has not said hello this long after its Spawn is replaced
MEMORY_CHECK = 1.0  # how often a running process actor's RSS is compared with max_process_memory_mb
KILL_GRACE = 1.0  # SIGTERM -> SIGKILL for a process actor replaced to stop its body


class Children:
    """The actor slots of this supervisor (and of its worker nodes) and their incarnations."""

    def __init__(
        self,
        app: App,
        registry: bytes,
        specs: list[ChildSpec],
        *,
        actor_endpoint: str,
        server_public: str | None,
        state_dir: Path,
        grace: float,
        nodes: NodeTable,
        outbox: Outbox,
        timers: Timers,
        poller: zmq.Poller,
        on_exit: Callable[[ActorProcess, str], None],
    ) -> None:
        self._app = app
        self._registry = registry
        self.specs = specs  # this host's slots, in start order
        self._endpoint = actor_endpoint
        self._server_public = server_public
        self._state_dir = state_dir
        self.grace = grace
        self._nodes = nodes
        self._outbox = outbox
        self._timers = timers
        self._poller = poller
        self._on_exit = on_exit
        self.procs: dict[str, ActorProcess] = {}  # slot -> live incarnation
        self._by_identity: dict[bytes, ActorProcess] = {}  # the actors' ZeroMQ routing ids
        self.records: dict[str, SlotRecord] = {}
        self._start_order: list[str] = []  # slots in the order they were first started
        self._to_stop: list[str] = []  # the stop protocol: slots still to stop, in reverse start order
        self.stopping = False
        self.template: ActorTemplate | None = None
        self.lease_until: float | None = None  # a cluster member's: its template stops every actor then
        self._template_intensity = RestartIntensity(app.max_restarts, app.restart_window)
        self._gens = itertools.count(1)  # incarnation numbers: a message from a buried one is ignored
        for spec in specs:
            self.add_slot(spec)

    # ---- the slots ---------------------------------------------------------------------------
    def add_slot(self, spec: ChildSpec) -> None:
        """A slot to supervise (a worker node's slots when it joins; kept when it rejoins)."""
        record = self.records.get(spec.slot)
        if record is None:
            self.records[spec.slot] = SlotRecord(RestartIntensity(self._app.max_restarts, self._app.restart_window))
        else:
            record.backoff_until = None

    def all_specs(self) -> list[ChildSpec]:
        return self.specs + self._nodes.specs()

    def pool_specs(self) -> list[ChildSpec]:
        """The slots that own lock keys: all but those of worker nodes that are leaving."""
        return [s for s in self.all_specs() if s.node is None or not self._nodes.leaving(s.node)]

    def slots(self) -> list[str]:
        return [s.slot for s in self.all_specs()]

    def get(self, slot: str) -> ActorProcess | None:
        return self.procs.get(slot)

    def by_identity(self, identity: bytes) -> ActorProcess | None:
        return self._by_identity.get(identity)

    def __iter__(self) -> Iterator[ActorProcess]:
        return iter(self.procs.values())

    def all_up(self) -> bool:
        """Every slot of this host has an actor that said hello (the runtime is ready)."""
        return len(self.procs) == len(self.specs) and all(p.ready for p in self.procs.values())

    # ---- starting ----------------------------------------------------------------------------
    def start(self) -> None:
        """The template, then every slot in order."""
        self.start_template()
        for spec in self.specs:
            self.start_actor(spec)

    def start_template(self) -> None:
        if self.template is None and not self.stopping:
            self.template = ActorTemplate(self._registry, sys.path)
            self._poller.register(self.template.fd, zmq.POLLIN)
            if self.lease_until is not None:
                self.template.lease(self.lease_until)

    def start_actor(self, spec: ChildSpec) -> None:
        if self.stopping or spec.slot in self.procs:
            return
        self.records[spec.slot].backoff_until = None
        if spec.slot not in self._start_order:
            self._start_order.append(spec.slot)
        if spec.node is not None:  # the node forks it; it says Hello on the TCP socket
            node = self._nodes.get(spec.node)
            if node is None or node.leaving or spec not in node.specs:
                return
            gen, now = next(self._gens), time.monotonic()
            remote = ActorProcess(spec, gen, 0, now, f"{spec.slot}.{gen}".encode(), last_seen=now)
            self._add(remote)
            self._outbox.to_node(node.identity, messages.Spawn(spec.slot, gen, spec.role))
            return
        proc = None
        if self.template is not None:
            proc = self.template.spawn(
                spec, next(self._gens), self._endpoint, self._server_public, str(self._state_dir)
            )
        if proc is None:  # no template right now: try again once it is back
            self._timers.add(0.2, self.start_actor, spec)
            return
        self._add(proc)

    def _add(self, proc: ActorProcess) -> None:
        self.procs[proc.spec.slot] = proc
        self._by_identity[proc.identity] = proc

    def welcome(self, proc: ActorProcess, extra: dict[str, Any]) -> None:
        """The actor said hello: it is ready; send its configuration (``extra``: its role's part)."""
        proc.ready = True
        config: dict[str, Any] = {"state_dir": str(self._state_dir), "concurrency": proc.spec.concurrency, **extra}
        if proc.spec.node is not None:
            config.update(state_dir="", node=proc.spec.node)
        self._outbox.to_actor(proc, messages.Welcome(config).encode())

    # ---- signals and exits -------------------------------------------------------------------
    def kill(self, proc: ActorProcess, sig: int = signal.SIGKILL) -> None:
        """Signal an actor: ours by pid, a node's through its node."""
        if proc.spec.node is None:
            signal_pid(proc.pid, sig)
            return
        node = self._nodes.get(proc.spec.node)
        if node is not None:
            self._outbox.to_node(node.identity, messages.Kill(proc.spec.slot, proc.gen, sig))

    def lease(self, until: float) -> None:
        """A cluster member's lease end (monotonic), for the template to enforce on the actors."""
        self.lease_until = until
        if self.template is not None:
            self.template.lease(until)

    def replace(self, proc: ActorProcess) -> None:
        """Kill an actor on purpose (to stop the body a process actor runs): SIGTERM, SIGKILL after
        KILL_GRACE; its exit is no crash and a new incarnation takes the slot."""
        proc.stopping = True
        self.kill(proc, signal.SIGTERM)
        self._timers.add(KILL_GRACE, self._kill_if_alive, proc)

    def _kill_if_alive(self, proc: ActorProcess) -> None:
        if self.procs.get(proc.spec.slot) is proc:
            self.kill(proc)

    def reap(self) -> None:
        """SIGCHLD: our only child is the template (actors are its children; it reports them)."""
        template = self.template
        if template is None or template.alive():
            return
        log.error(
            "the actor template (pid %d) died with %s; its actors die with it",
            template.pid,
            exit_cause(template.popen.returncode),
        )
        self.on_template_events()
        self._poller.unregister(template.fd)
        template.close(0)
        self.template = None
        for proc in list(self.procs.values()):
            if proc.spec.node is None:  # a node's actors are its template's children, not ours
                self.exited(proc, -signal.SIGKILL)
        if not self.stopping:
            self._timers.add(self._template_intensity.next_delay(time.monotonic()), self.start_template)

    def on_template_events(self) -> None:
        # restarting a slot forks at once and may read more events: loop until none is left
        while self.template is not None:
            events = self.template.events()
            if not events:
                return
            for event in events:
                by_pid = {proc.pid: proc for proc in self.procs.values() if proc.spec.node is None}
                proc = by_pid.get(event.get("pid", -1))
                if event.get("op") == "exit" and proc is not None:
                    self.exited(proc, event["code"])

    def exited(self, proc: ActorProcess, code: int, cause: str | None = None) -> None:
        """An incarnation is gone: report it, then restart its slot as its spec says."""
        slot = proc.spec.slot
        del self.procs[slot]
        self._by_identity.pop(proc.identity, None)
        cause = cause or exit_cause(code)
        record = self.records[slot]
        record.last_exit = cause
        self._on_exit(proc, cause)
        if self.stopping:
            self._stop_next()
            return
        if proc.spec.node is not None and self._nodes.leaving(proc.spec.node):
            node = self._nodes.get(proc.spec.node)  # leaving (forgotten once its last actor is gone) or lost
            if node is not None and not any(s.slot in self.procs for s in node.specs):
                self.forget_node_slots(node.specs)
                self._nodes.forget(node)
            return
        deliberate = proc.stopping  # recycled or replaced by us (hard cancel, timeout): not a crash
        if not deliberate:
            record.restarts += 1
            if not proc.spec.restarts_after(code):
                log.warning(
                    "actor %s (pid %d) exited with %s; not restarted (%s)", slot, proc.pid, cause, proc.spec.restart
                )
                return
            log.warning("actor %s (pid %d) exited with %s; restarting", slot, proc.pid, cause)
        delay = 0.0 if deliberate else record.intensity.next_delay(time.monotonic())
        if delay:
            log.error(
                "actor %s restarted more than %d times in %.0f s; next restart in %.1f s",
                slot,
                self._app.max_restarts,
                self._app.restart_window,
                delay,
            )
            record.backoff_until = time.time() + delay
            self._timers.add(delay, self.start_actor, proc.spec)
        else:
            self.start_actor(proc.spec)

    def forget_node_slots(self, specs: list[ChildSpec]) -> None:
        """A node left or was lost: its slots wait for it without a restart back-off."""
        for spec in specs:
            self.records[spec.slot].backoff_until = None

    # ---- health ------------------------------------------------------------------------------
    def check_heartbeats(self) -> None:
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.spec.node is not None:  # a node's actor: its node reports exits, or is lost
                if not proc.ready and now - proc.started > SPAWN_TIMEOUT:
                    self.kill(proc)
                    self.exited(proc, -signal.SIGKILL, f"did not say hello within {SPAWN_TIMEOUT:.0f} s")
                elif proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                    log.error("actor %s sent no heartbeat for %.0f s; killing it", proc.spec.slot, now - proc.last_seen)
                    self.kill(proc)
                continue
            if not pid_alive(proc.pid):  # its exit report never came: never leave a dead slot
                proc.missing_checks += 1
                if proc.missing_checks >= 2:
                    log.error(
                        "actor %s (pid %d) is gone but its exit was not reported; restarting it",
                        proc.spec.slot,
                        proc.pid,
                    )
                    self.exited(proc, -signal.SIGKILL)
                continue
            if proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                log.error(
                    "actor %s (pid %d) sent no heartbeat for %.0f s; killing it",
                    proc.spec.slot,
                    proc.pid,
                    now - proc.last_seen,
                )
                self.kill(proc)
        self._timers.add(HEARTBEAT_CHECK, self.check_heartbeats)

    def check_memory(self) -> None:
        for proc in list(self.procs.values()):
            if proc.running:
                self.maybe_recycle(proc)
        self._timers.add(MEMORY_CHECK, self.check_memory)

    def maybe_recycle(self, proc: ActorProcess) -> None:
        """Replace a process actor after max_tasks_per_process tasks or past max_process_memory_mb.
        The recycle is graceful: the attempt it is running finishes first, nothing is lost."""
        if proc.spec.role != ROLE_PROCESS or proc.stopping or not proc.ready:
            return
        reason = None
        max_tasks, max_mb = self._app.max_tasks_per_process, self._app.max_process_memory_mb
        if max_tasks and proc.tasks_done >= max_tasks:
            reason = f"it ran {proc.tasks_done} tasks (max_tasks_per_process={max_tasks})"
        elif max_mb:
            rss = self.rss_of(proc)
            if rss is None:
                return
            if rss > max_mb * 2**20:
                reason = f"its RSS is {rss / 2**20:.0f} MB (max_process_memory_mb={max_mb})"
        if reason:
            log.info("recycling actor %s (pid %d): %s", proc.spec.slot, proc.pid, reason)
            self.stop_actor(proc)

    def stop_actor(self, proc: ActorProcess, grace: float | None = None) -> None:
        """Ask an actor to exit once its attempts end (its held Runs are given back); one that
        has not said hello yet has nothing to finish and is killed."""
        proc.stopping = True
        if proc.ready:
            self._outbox.to_actor(proc, messages.Stop(self.grace if grace is None else grace).encode())
        else:
            self.kill(proc)

    def rss_of(self, proc: ActorProcess) -> int | None:
        if proc.spec.node is None:
            return local_rss(proc.pid)
        node = self._nodes.get(proc.spec.node)
        return node.rss.get(proc.spec.slot) if node is not None else None

    # ---- stopping ----------------------------------------------------------------------------
    def begin_stop(self) -> None:
        """SIGTERM/SIGINT: stop the children one at a time in reverse start order (OTP's order:
        the clock first, so nothing fires into pools that are stopping), each after the one
        started after it has exited. Nothing new is dispatched meanwhile, so waiting costs no
        running task its grace: at ``grace`` whatever is left is killed, in the same order."""
        if self.stopping:
            log.warning("second stop signal: killing the actors now")
            self.kill_all()
            return
        log.info("stopping: running tasks get %.1f s to finish", self.grace)
        self.stopping = True
        self._to_stop = [slot for slot in reversed(self._start_order) if slot in self.procs]
        self._timers.add(self.grace, self.kill_all)
        self._stop_next()

    def _stop_next(self) -> None:
        """Stop the next child in line, unless the one before it is still on its way out."""
        while self._to_stop:
            proc = self.procs.get(self._to_stop[0])
            if proc is None:  # gone already
                self._to_stop.pop(0)
                continue
            if not proc.stopping:  # else it is on its way out already (recycled, replaced)
                self.stop_actor(proc)
            return

    def kill_all(self) -> None:
        for slot in reversed(self._start_order):
            proc = self.procs.get(slot)
            if proc is not None:
                self.kill(proc)

    def close(self) -> None:
        """Teardown: kill what is left and close the template."""
        for proc in list(self.procs.values()):
            self.kill(proc)
        if self.template is not None:
            self.template.close()
