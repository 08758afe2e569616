"""Child specs, restart intensity and the actor processes the supervisor owns (OTP-shaped)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from .. import messages
from ..transport import DB_FILE, pid_alive

if TYPE_CHECKING:
    from .core import Supervisor

log = logging.getLogger("capsule_actors.supervisor")

ROLE_WORKER = "worker"
ROLE_PROCESS = "process"
ROLE_CLOCK = "clock"
HEARTBEAT_TIMEOUT = 15.0  # an actor silent this long is hung: kill and restart it
HEARTBEAT_CHECK = 1.0
SPAWN_TIMEOUT = 30.0  # a node's actor that has not said hello this long after its Spawn is replaced
MEMORY_CHECK = 1.0  # how often a running process actor's RSS is compared with max_process_memory_mb
WORKER_CONCURRENCY = 100  # attempts one worker actor runs at once on its event loop
PROCESS_PREFETCH = 2  # Runs a busy process actor holds: no idle gap between tasks (1 left gaps with no-ops)


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """What one actor slot is: validated once, restarted from the same spec."""

    slot: str
    role: str
    concurrency: int
    shutdown_grace: float
    restart: str = "permanent"  # OTP: restart whatever the exit, unless we are stopping
    node: str | None = None  # the worker node it runs on; None: this host, forked by our template
    max_tasks: int = 0  # a process actor is recycled after this many tasks (0: never)

    def __post_init__(self) -> None:
        if self.role not in (ROLE_WORKER, ROLE_PROCESS, ROLE_CLOCK):
            raise ValueError(f"unknown actor role {self.role!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


class RestartIntensity:
    """More than ``max_restarts`` restarts within ``window`` seconds -> back off exponentially."""

    def __init__(self, max_restarts: int, window: float, base_delay: float = 0.5, max_delay: float = 30.0):
        self.max_restarts = max_restarts
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._times: collections.deque[float] = collections.deque()
        self._over = 0

    def next_delay(self, now: float) -> float:
        """Record a restart at monotonic ``now``; return how long to wait before doing it."""
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) <= self.max_restarts:
            self._over = 0
            return 0.0
        self._over += 1
        return float(min(self.max_delay, self.base_delay * 2 ** (self._over - 1)))


@dataclasses.dataclass
class SlotRecord:
    """What the supervisor keeps about a slot across its incarnations (for restarts and status)."""

    intensity: RestartIntensity
    restarts: int = 0  # crashes (not deliberate replacements)
    last_exit: str | None = None
    backoff_until: float | None = None  # wall time of a restart delayed by the restart intensity


def exit_cause(returncode: int) -> str:
    """'exit code 1' or 'signal SIGKILL' for logs and status."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclasses.dataclass(eq=False)
class ActorProcess:
    """One running incarnation of a slot."""

    spec: ChildSpec
    gen: int
    pid: int
    started: float
    identity: bytes
    ready: bool = False
    last_seen: float = 0.0
    stopping: bool = False  # recycled or being replaced on purpose: its exit is not a crash
    running: dict[str, int] = dataclasses.field(default_factory=dict)  # task id -> attempt, in Run order
    begun: set[str] = dataclasses.field(default_factory=set)  # a process actor's attempts it said it began
    withdrawing: set[str] = dataclasses.field(default_factory=set)  # held Runs asked back (Withdraw sent)
    abandoned: set[str] = dataclasses.field(default_factory=set)  # cancelled, awaiting its Done
    admitting: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # Admit sent, no answer yet
    tasks_done: int = 0
    missing_checks: int = 0  # heartbeat checks that found its pid gone without an exit report

    @property
    def load(self) -> int:
        return len(self.running) + len(self.abandoned)

    def has_room(self) -> bool:
        ahead = 0
        if self.spec.role == ROLE_PROCESS and (
            not self.spec.max_tasks  # hold none it will not run
            or self.tasks_done + self.load < self.spec.max_tasks
        ):
            ahead = PROCESS_PREFETCH
        return self.ready and not self.stopping and self.load < self.spec.concurrency + ahead

    def began(self, task_id: str) -> bool:
        """Whether the attempt's body started: a worker actor starts each Run on arrival; a
        process actor runs one at a time and says Started for each."""
        return self.spec.role != ROLE_PROCESS or task_id in self.begun

    @property
    def busy(self) -> int:
        """Attempts it is running (a process actor's held Run not counted)."""
        return sum(1 for task_id in self.running if self.began(task_id))


class ActorTemplate:
    """The supervisor's handle on the warm template process that forks every actor."""

    def __init__(self, registry: bytes, env_path: list[str], spawn_timeout: float = 30.0) -> None:
        out_r, out_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in env_path if p))
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "capsule_actors.actors.template",
            "--parent",
            str(os.getpid()),
            "--out-fd",
            str(out_w),
        ]
        try:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(out_w,), env=env)
        finally:
            os.close(out_w)
        self.fd = out_r
        os.set_blocking(out_r, False)
        self.spawn_timeout = spawn_timeout
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        self._write(struct.pack("!Q", len(registry)) + registry)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _write(self, data: bytes) -> bool:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(data)
            self.popen.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def spawn(
        self, spec: ChildSpec, gen: int, endpoint: str, server_key: str | None, state_dir: str, **extra: Any
    ) -> ActorProcess | None:
        """Fork an actor for ``spec``; None when the template is gone (it will be replaced).
        ``extra`` goes to the actor's ``ActorArgs`` (a worker node's keys and lease file)."""
        actor = {
            "slot": spec.slot,
            "gen": gen,
            "role": spec.role,
            "endpoint": endpoint,
            "server_key": server_key,
            "state_dir": state_dir,
            **extra,
        }
        if not self._write((json.dumps({"op": "spawn", "actor": actor}) + "\n").encode()):
            return None
        deadline = time.monotonic() + self.spawn_timeout
        while time.monotonic() < deadline:
            found = None
            for event in self._read(deadline - time.monotonic()):
                if event.get("op") == "spawned" and event["slot"] == spec.slot and event["gen"] == gen:
                    found = event
                else:
                    self._events.append(event)  # e.g. another actor's exit: the supervisor needs it
            if found is not None:
                now = time.monotonic()
                return ActorProcess(spec, gen, found["pid"], now, f"{spec.slot}.{gen}".encode(), last_seen=now)
            if not self.alive():
                return None
        log.error("the actor template did not fork %s within %.0f s", spec.slot, self.spawn_timeout)
        return None

    def pending(self) -> bool:
        """Events read while waiting for a spawn, not handed to the supervisor yet."""
        return bool(self._events)

    def events(self) -> list[dict[str, Any]]:
        """Everything the template reported since the last call (``exit`` events matter)."""
        events, self._events = self._events + self._read(0.0), []
        return events

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        if not select.select([self.fd], [], [], max(0.0, timeout))[0]:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        return [json.loads(line) for line in lines if line]

    def close(self, timeout: float = 5.0) -> None:
        """Close its stdin (it stops its children and exits); kill it if it does not."""
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        os.close(self.fd)


def kill(proc: ActorProcess, sig: int = signal.SIGKILL) -> None:
    """Signal an actor by pid (it is the template's child, not ours)."""
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def local_rss(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


def actor_status(
    proc: ActorProcess | None, spec: ChildSpec, record: SlotRecord, keys: int = 0, rss: int | None = None
) -> dict[str, Any]:
    """One row of ``capsule-actors status`` (``rss``: what a worker node reported for it)."""
    state = "restarting" if record.backoff_until else "down"
    if proc is not None:
        state = "stopping" if proc.stopping else ("ready" if proc.ready else "starting")
        if spec.node is None:
            rss = local_rss(proc.pid)
    return {
        "slot": spec.slot,
        "role": spec.role,
        "node": spec.node,
        "pid": proc.pid or None if proc else None,
        "state": state,
        "restarts": record.restarts,
        "rss": rss if proc else None,
        "running": proc.busy if proc else 0,
        "held": len(proc.running) - proc.busy if proc else 0,
        "tasks_done": proc.tasks_done if proc else 0,
        "last_exit": record.last_exit,
        "keys": keys,
    }


class Children:
    """Supervises the actor processes: the fork template, spawns, exits and restarts (with
    restart intensity), heartbeats, memory and task-count recycling, and the stop protocol.
    The table of live incarnations (``Supervisor.procs``) is read by every part, so it stays there."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.template: ActorTemplate | None = None
        self.template_intensity = RestartIntensity(sup.app.max_restarts, sup.app.restart_window)
        self.gens = itertools.count(1)  # incarnation numbers: a message from a buried one is ignored
        self.by_identity: dict[bytes, ActorProcess] = {}  # the actors' ZeroMQ routing ids
        self.slots: dict[str, SlotRecord] = {}
        for spec in sup.specs:
            self.add_slot(spec)

    def add_slot(self, spec: ChildSpec) -> None:
        """A slot to supervise (a worker node's slots when it joins; kept when it rejoins)."""
        record = self.slots.get(spec.slot)
        if record is None:
            app = self.sup.app
            self.slots[spec.slot] = SlotRecord(RestartIntensity(app.max_restarts, app.restart_window))
        else:
            record.backoff_until = None

    def kill_actor(self, proc: ActorProcess, sig: int = signal.SIGKILL) -> None:
        """Signal an actor: ours by pid, a node's through its node."""
        if proc.spec.node is None:
            kill(proc, sig)
            return
        node = self.sup.node_link.get(proc.spec.node)
        if node is not None:
            self.sup.node_link.send(node.identity, messages.Kill(proc.spec.slot, proc.gen, sig))

    def on_signals(self) -> None:
        try:
            data = self.sup.sig_r.recv(4096)
        except BlockingIOError:
            return
        sigs = set(data)
        if signal.SIGCHLD in sigs:
            self.reap()
        if sigs & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            self.begin_stop()

    def reap(self) -> None:
        """SIGCHLD: our only child is the template (actors are its children; it reports them)."""
        sup = self.sup
        template = self.template
        if template is None or template.alive():
            return
        log.error(
            "the actor template (pid %d) died with %s; its actors die with it",
            template.pid,
            exit_cause(template.popen.returncode),
        )
        self.on_template_events()
        sup.poller.unregister(template.fd)
        template.close(0)
        self.template = None
        for proc in list(sup.procs.values()):
            if proc.spec.node is None:  # a node's actors are its template's children, not ours
                self.on_exit(proc, -signal.SIGKILL)
        if not sup.stopping:
            delay = self.template_intensity.next_delay(time.monotonic())
            sup.add_timer(delay, self.start_template)

    def start_template(self) -> None:
        sup = self.sup
        if self.template is None and not sup.stopping:
            self.template = ActorTemplate(sup.registry, sys.path)
            sup.poller.register(self.template.fd, zmq.POLLIN)

    def on_template_events(self) -> None:
        sup = self.sup
        # restarting a slot forks at once and may read more events: loop until none is left
        while self.template is not None:
            events = self.template.events()
            if not events:
                return
            for event in events:
                by_pid = {proc.pid: proc for proc in sup.procs.values() if proc.spec.node is None}
                proc = by_pid.get(event.get("pid", -1))
                if event.get("op") == "exit" and proc is not None:
                    self.on_exit(proc, event["code"])

    def start_actor(self, spec: ChildSpec) -> None:
        sup = self.sup
        if sup.stopping or spec.slot in sup.procs:
            return
        self.slots[spec.slot].backoff_until = None
        if spec.node is not None:  # the node forks it; it says Hello on the TCP socket
            node = sup.node_link.get(spec.node)
            if node is None or node.leaving or spec not in node.specs:
                return
            gen, now = next(self.gens), time.monotonic()
            remote = ActorProcess(spec, gen, 0, now, f"{spec.slot}.{gen}".encode(), last_seen=now)
            sup.procs[spec.slot] = remote
            self.by_identity[remote.identity] = remote
            sup.node_link.send(node.identity, messages.Spawn(spec.slot, gen, spec.role))
            return
        proc = None
        if self.template is not None:
            proc = self.template.spawn(spec, next(self.gens), sup.actor_addr, sup.server_public, str(sup.state_dir))
        if proc is None:  # no template right now: try again once it is back
            sup.add_timer(0.2, self.start_actor, spec)
            return
        sup.procs[spec.slot] = proc
        self.by_identity[proc.identity] = proc

    def on_exit(self, proc: ActorProcess, code: int, cause: str | None = None) -> None:
        sup = self.sup
        slot = proc.spec.slot
        del sup.procs[slot]
        self.by_identity.pop(proc.identity, None)
        cause = cause or exit_cause(code)
        record = self.slots[slot]
        record.last_exit = cause
        for item in proc.admitting.values():  # resent to the key's owner (this slot's next incarnation)
            sup.keys.admit(item)
        for task_id in proc.abandoned:  # its body died with it: the key is free
            abandoned = sup.abandoned_keys.pop(task_id, None)
            if abandoned is not None:
                sup.keys.release(abandoned)
        sup.attempts.settle(proc, cause)
        if sup.stopping:
            return
        if proc.spec.node is not None and sup.node_link.leaving(proc.spec.node):
            node = sup.node_link.get(proc.spec.node)  # leaving (forgotten once its last actor is gone) or lost
            if node is not None and not any(s.slot in sup.procs for s in node.specs):
                sup.node_link.forget(node)
            return
        deliberate = proc.stopping  # recycled by us (hard cancel, timeout): not a crash
        if not deliberate:
            record.restarts += 1
            log.warning("actor %s (pid %d) exited with %s; restarting", slot, proc.pid, cause)
        delay = 0.0 if deliberate else record.intensity.next_delay(time.monotonic())
        if delay:
            log.error(
                "actor %s restarted more than %d times in %.0f s; next restart in %.1f s",
                slot,
                sup.app.max_restarts,
                sup.app.restart_window,
                delay,
            )
            record.backoff_until = time.time() + delay
            sup.add_timer(delay, self.start_actor, proc.spec)
        else:
            self.start_actor(proc.spec)

    def check_heartbeats(self) -> None:
        now = time.monotonic()
        for proc in list(self.sup.procs.values()):
            if proc.spec.node is not None:  # a node's actor: its node reports exits, or is lost
                if not proc.ready and now - proc.started > SPAWN_TIMEOUT:
                    self.kill_actor(proc)
                    self.on_exit(proc, -signal.SIGKILL, f"did not say hello within {SPAWN_TIMEOUT:.0f} s")
                elif proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                    log.error("actor %s sent no heartbeat for %.0f s; killing it", proc.spec.slot, now - proc.last_seen)
                    self.kill_actor(proc)
                continue
            if not pid_alive(proc.pid):  # its exit report never came: never leave a dead slot
                proc.missing_checks += 1
                if proc.missing_checks >= 2:
                    log.error(
                        "actor %s (pid %d) is gone but its exit was not reported; restarting it",
                        proc.spec.slot,
                        proc.pid,
                    )
                    self.on_exit(proc, -signal.SIGKILL)
                continue
            if proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                log.error(
                    "actor %s (pid %d) sent no heartbeat for %.0f s; killing it",
                    proc.spec.slot,
                    proc.pid,
                    now - proc.last_seen,
                )
                self.kill_actor(proc)
        self.sup.add_timer(HEARTBEAT_CHECK, self.check_heartbeats)

    def check_memory(self) -> None:
        for proc in list(self.sup.procs.values()):
            if proc.running:
                self.maybe_recycle(proc)
        self.sup.add_timer(MEMORY_CHECK, self.check_memory)

    def maybe_recycle(self, proc: ActorProcess) -> None:
        """Replace a process actor after max_tasks_per_process tasks or past max_process_memory_mb.
        The recycle is graceful: the attempt it is running finishes first, nothing is lost."""
        sup = self.sup
        if proc.spec.role != ROLE_PROCESS or proc.stopping or not proc.ready:
            return
        reason = None
        max_tasks, max_mb = sup.app.max_tasks_per_process, sup.app.max_process_memory_mb
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
            proc.stopping = True
            sup.send_actor(proc, messages.Stop(sup.grace).encode())

    def rss_of(self, proc: ActorProcess) -> int | None:
        if proc.spec.node is None:
            return local_rss(proc.pid)
        node = self.sup.node_link.get(proc.spec.node)
        return node.rss.get(proc.spec.slot) if node is not None else None

    def begin_stop(self) -> None:
        sup = self.sup
        if sup.stopping:
            log.warning("second stop signal: killing the actors now")
            self.kill_all()
            return
        log.info("stopping: running tasks get %.1f s to finish", sup.grace)
        sup.stopping = True
        for proc in sup.procs.values():
            proc.stopping = True
            if proc.ready:
                sup.send_actor(proc, messages.Stop(sup.grace).encode())
            else:
                self.kill_actor(proc)
        sup.add_timer(sup.grace, self.kill_all)

    def kill_all(self) -> None:
        for proc in self.sup.procs.values():
            self.kill_actor(proc)

    def on_hello(self, proc: ActorProcess) -> None:
        """Welcome the actor with the registry and the live keys of its slot (read from the
        store), then the admission requests that waited for it."""
        sup = self.sup
        proc.ready = True
        slot = proc.spec.slot
        config: dict[str, Any] = {"state_dir": str(sup.state_dir), "concurrency": proc.spec.concurrency}
        if proc.spec.role == ROLE_CLOCK:
            config.update(schedules=sup.store.schedule_marks(), db=str(sup.state_dir / DB_FILE))
            sup.wake_clock = False
        else:
            config["keys"] = sup.keys.key_rows().get(slot, [])
        if proc.spec.node is not None:
            config.update(state_dir="", node=proc.spec.node)
        sup.send_actor(proc, messages.Welcome(config).encode())
        waiting, sup.keys.pending_admits[slot] = sup.keys.pending_admits.get(slot, []), []
        for item in waiting:
            sup.keys.admit(item)
        if all(p.ready for p in sup.procs.values()) and len(sup.procs) == len(sup.specs):
            sup._announce_ready()
