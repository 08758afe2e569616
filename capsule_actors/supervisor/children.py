"""Child specs, restart intensity and the actor processes the supervisor owns (OTP-shaped)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger("capsule_actors.supervisor")

# Exit codes an actor uses on purpose; anything else is a crash.
EXIT_OK = 0
EXIT_PARENT_GONE = 3
EXIT_INJECTED_CRASH = 70

ROLE_WORKER = "worker"
ROLE_PROCESS = "process"


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """What one actor slot is: validated once, restarted from the same spec."""

    slot: str
    role: str
    concurrency: int
    shutdown_grace: float
    restart: str = "permanent"  # OTP: restart whatever the exit, unless we are stopping

    def __post_init__(self) -> None:
        if self.role not in (ROLE_WORKER, ROLE_PROCESS):
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
        return min(self.max_delay, self.base_delay * 2 ** (self._over - 1))


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
    popen: subprocess.Popen[bytes]
    started: float
    identity: bytes
    ready: bool = False
    last_seen: float = 0.0
    stopping: bool = False
    running: dict[str, int] = dataclasses.field(default_factory=dict)  # task id -> attempt
    abandoned: set[str] = dataclasses.field(default_factory=set)  # cancelled, awaiting its Done
    admitting: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # Admit sent, no answer yet
    tasks_done: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def load(self) -> int:
        return len(self.running) + len(self.abandoned)

    def has_room(self) -> bool:
        return self.ready and not self.stopping and self.load < self.spec.concurrency


def spawn_actor(spec: ChildSpec, gen: int, endpoint: str, server_public: str | None,
                state_dir: str, env_path: list[str]) -> ActorProcess:
    """Start the actor program for ``spec`` as a child process of the supervisor."""
    identity = f"{spec.slot}.{gen}"
    cmd = [sys.executable, "-m", "capsule_actors.actors", "--slot", spec.slot, "--gen", str(gen),
           "--role", spec.role, "--endpoint", endpoint, "--parent", str(os.getpid())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env_path if p)
    env["CAPSULE_STATE_DIR"] = state_dir
    if server_public:
        env["CAPSULE_SERVER_KEY"] = server_public
    popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True)
    now = time.monotonic()
    return ActorProcess(spec, gen, popen, now, identity.encode(), last_seen=now)


def kill(proc: ActorProcess, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def actor_status(proc: ActorProcess | None, spec: ChildSpec, restarts: int, last_exit: str | None,
                 backoff_until: float | None, keys: int = 0) -> dict[str, Any]:
    """One row of ``capsule-actors status``."""
    rss = None
    state = "restarting" if backoff_until else "down"
    if proc is not None:
        state = "stopping" if proc.stopping else ("ready" if proc.ready else "starting")
        try:
            import psutil

            rss = psutil.Process(proc.pid).memory_info().rss
        except Exception:
            rss = None
    return {
        "slot": spec.slot, "role": spec.role, "pid": proc.pid if proc else None, "state": state,
        "restarts": restarts, "rss": rss, "running": proc.load if proc else 0,
        "tasks_done": proc.tasks_done if proc else 0, "last_exit": last_exit, "keys": keys,
    }
