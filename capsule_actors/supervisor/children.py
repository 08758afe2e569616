"""Child specs, restart intensity and the actor processes the supervisor owns (OTP-shaped)."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger("capsule_actors.supervisor")

ROLE_WORKER = "worker"
ROLE_PROCESS = "process"
ROLE_CLOCK = "clock"
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
        if self.spec.role == ROLE_PROCESS and (not self.spec.max_tasks  # hold none it will not run
                                               or self.tasks_done + self.load < self.spec.max_tasks):
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
        cmd = [sys.executable, "-P", "-m", "capsule_actors.actors.template", "--parent", str(os.getpid()),
               "--out-fd", str(out_w)]
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

    def spawn(self, spec: ChildSpec, gen: int, endpoint: str, server_key: str | None,
              state_dir: str, **extra: Any) -> ActorProcess | None:
        """Fork an actor for ``spec``; None when the template is gone (it will be replaced).
        ``extra`` goes to the actor's ``ActorArgs`` (a worker node's keys and lease file)."""
        actor = {"slot": spec.slot, "gen": gen, "role": spec.role, "endpoint": endpoint,
                 "server_key": server_key, "state_dir": state_dir, **extra}
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


def actor_status(proc: ActorProcess | None, spec: ChildSpec, restarts: int, last_exit: str | None,
                 backoff_until: float | None, keys: int = 0, rss: int | None = None) -> dict[str, Any]:
    """One row of ``capsule-actors status`` (``rss``: what a worker node reported for it)."""
    state = "restarting" if backoff_until else "down"
    if proc is not None:
        state = "stopping" if proc.stopping else ("ready" if proc.ready else "starting")
        if spec.node is None:
            rss = local_rss(proc.pid)
    return {
        "slot": spec.slot, "role": spec.role, "node": spec.node, "pid": proc.pid or None if proc else None,
        "state": state, "restarts": restarts, "rss": rss if proc else None, "running": proc.busy if proc else 0,
        "held": len(proc.running) - proc.busy if proc else 0,
        "tasks_done": proc.tasks_done if proc else 0, "last_exit": last_exit, "keys": keys,
    }
