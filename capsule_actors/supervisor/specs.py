"""What the supervisor knows about its children: child specs and their restart types (OTP's
shape), restart intensity, and the record of each running actor incarnation."""

from __future__ import annotations

import collections
import dataclasses
import os
import signal

from ..lifecycle import normal_exit

ROLE_WORKER = "worker"
ROLE_PROCESS = "process"
ROLE_CLOCK = "clock"
ROLES = (ROLE_WORKER, ROLE_PROCESS, ROLE_CLOCK)
WORKER_CONCURRENCY = 100  # attempts one worker actor runs at once on its event loop
PROCESS_PREFETCH = 2  # Runs a busy process actor holds: no idle gap between tasks (1 left gaps with no-ops)

# OTP's restart types. Every slot of ours is permanent: a pool keeps its size and the clock always
# runs. transient and temporary are honoured for the specs that ask for them.
PERMANENT = "permanent"  # restarted whatever the exit
TRANSIENT = "transient"  # restarted after an abnormal exit only (lifecycle.EXIT_REASONS)
TEMPORARY = "temporary"  # never restarted
RESTART_TYPES = (PERMANENT, TRANSIENT, TEMPORARY)


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """What one actor slot is: validated once, restarted from the same spec."""

    slot: str
    role: str
    concurrency: int
    shutdown_grace: float
    restart: str = PERMANENT
    node: str | None = None  # the worker node it runs on; None: this host, forked by our template
    max_tasks: int = 0  # a process actor is recycled after this many tasks (0: never)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown actor role {self.role!r}; expected one of {ROLES}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.restart not in RESTART_TYPES:
            raise ValueError(f"restart={self.restart!r}; expected one of {RESTART_TYPES}")

    def restarts_after(self, returncode: int) -> bool:
        """Whether an exit with ``returncode`` (negative: a signal) calls for a new incarnation."""
        if self.restart == PERMANENT:
            return True
        return self.restart == TRANSIENT and not normal_exit(returncode)


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


@dataclasses.dataclass(eq=False)
class ActorProcess:
    """One running incarnation of a slot.

    Who writes what: ``Children`` its life (``ready``, ``stopping``, ``last_seen``, ``pid``,
    ``missing_checks``); ``Attempts`` the attempts it was sent (``running``, ``begun``,
    ``withdrawing``, ``abandoned``, ``tasks_done``); ``KeyRouting`` the admissions it was asked
    (``admitting``)."""

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


def signal_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal an actor of this host by pid (it is the template's child, not ours)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def local_rss(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None
