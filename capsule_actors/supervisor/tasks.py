"""The live tasks the supervisor holds in memory and the queues they wait in.

``TaskTable`` alone writes them: the tasks by id, a ready queue per pool (unlocked tasks), a
queue per slot (locked tasks, run by their key's owner), and the locked tasks whose attempt was
abandoned (cancelled or timed out) while their body still runs and holds the key. Every queue is a
``ReadyQueue``: highest priority first, first in first out within a priority.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..states import QUEUED, SCHEDULED, TaskState
from .specs import ROLE_PROCESS, ROLE_WORKER

if TYPE_CHECKING:
    from ..app import App
    from .specs import ActorProcess
    from .timers import Timers


class LiveTask:
    """A task that is queued, scheduled or running: held in memory until it ends."""

    __slots__ = (
        "actor",
        "attempts",
        "blocked",
        "id",
        "link",
        "lock_key",
        "name",
        "owner",
        "priority",
        "rate_key",
        "run_at",
        "session_id",
        "session_owner",
        "since",
        "state",
        "trace",
    )

    def __init__(
        self,
        task_id: str,
        name: str,
        state: TaskState,
        attempts: int,
        lock_key: str | None,
        session_id: str | None,
        session_owner: str | None,
        owner: str | None = None,
        blocked: bool = False,
        run_at: float | None = None,
        priority: int = 0,
        rate_key: str | None = None,
    ) -> None:
        self.id = task_id
        self.name = name
        self.state = state
        self.attempts = attempts
        self.lock_key = lock_key
        self.session_id = session_id
        self.session_owner = session_owner
        self.actor: ActorProcess | None = None
        self.owner = owner  # the slot that owns the lock key (and runs the task)
        self.blocked = blocked  # queued behind the key's holder (on_conflict="queue")
        self.run_at = run_at
        self.priority = priority  # higher starts first
        self.rate_key = rate_key  # the budget of a keyed rate limit it counts against
        self.trace: str | None = None  # the submitter's span (W3C traceparent), when it traces
        self.link: str | None = None  # the span of its last attempt that reported one
        self.since = time.monotonic()  # when it was last queued, then when its attempt started (/metrics)


class ReadyQueue:
    """Task ids waiting to start: the highest priority first, first in first out within one.

    One deque per priority in use, and ``top``, the one that starts next, kept up to date as
    levels fill and empty: a queue of default tasks (priority 0 only) costs what a plain deque
    does. A level other than 0 is dropped once it runs empty."""

    __slots__ = ("_levels", "_order", "top")

    def __init__(self) -> None:
        zero: collections.deque[str] = collections.deque()
        self._levels: dict[int, collections.deque[str]] = {0: zero}
        self._order: list[int] = [0]  # the priorities in use, highest first
        self.top = zero  # the highest level with tasks; level 0 (empty) when none has any

    def _retop(self) -> None:
        levels = self._levels
        self.top = next((levels[p] for p in self._order if levels[p]), levels[0])

    def _new_level(self, priority: int) -> collections.deque[str]:
        queue = self._levels[priority] = collections.deque()
        bisect.insort(self._order, priority, key=lambda p: -p)
        return queue

    def append(self, task_id: str, priority: int = 0) -> None:
        queue = self._levels.get(priority)
        if queue is None:
            queue = self._new_level(priority)
        queue.append(task_id)
        if queue is not self.top:
            self._retop()

    def appendleft(self, task_id: str, priority: int = 0) -> None:
        """Back to the head of its priority (a Run given back, a task a limit held back)."""
        queue = self._levels.get(priority)
        if queue is None:
            queue = self._new_level(priority)
        queue.appendleft(task_id)
        if queue is not self.top:
            self._retop()

    def popleft(self) -> str:
        top = self.top
        task_id = top.popleft()
        if not top and len(self._order) > 1:
            for priority in [p for p in self._order if p != 0 and not self._levels[p]]:
                self._order.remove(priority)
                del self._levels[priority]
            self._retop()
        return task_id

    def __bool__(self) -> bool:
        return bool(self.top)

    def __len__(self) -> int:
        return sum(len(q) for q in self._levels.values())

    def __iter__(self) -> Iterator[str]:
        """In the order they would start."""
        for priority in list(self._order):
            yield from self._levels.get(priority, ())

    def count(self, priority: int) -> int:
        queue = self._levels.get(priority)
        return len(queue) if queue is not None else 0


class PendingSubmit:
    """A Submit whose locked items wait for their owner actors' admission decisions."""

    __slots__ = ("fire", "ident", "journaled", "push", "remaining", "req", "results")

    def __init__(
        self,
        ident: bytes,
        req: int,
        size: int,
        fire: tuple[str, float] | None = None,
        push: list[int] | None = None,
        journaled: bool = False,
    ) -> None:
        self.ident = ident
        self.journaled = journaled  # durable in the client's journal: its ack may wait for any commit
        self.req = req
        self.results: list[list[Any] | None] = [None] * size  # [id, deduplicated, conflict] per item
        self.remaining = 0
        self.fire = fire  # (schedule name, slot) when the clock fired it
        self.push = push or []  # per item: the client's request id for its outcome


class TaskTable:
    """The live tasks and their queues."""

    def __init__(self, app: App, slots: Iterable[str], timers: Timers) -> None:
        self._app = app
        self._timers = timers
        self.live: dict[str, LiveTask] = {}
        self.ready = {ROLE_WORKER: ReadyQueue(), ROLE_PROCESS: ReadyQueue()}
        self.slot_ready = {slot: ReadyQueue() for slot in slots}  # locked tasks by owner slot
        self.abandoned_keys: dict[str, LiveTask] = {}  # cancelled/timed-out locked tasks still unwinding
        self.clock_wanted = False  # a task went SCHEDULED in the store only: the clock must look again

    def get(self, task_id: str) -> LiveTask | None:
        return self.live.get(task_id)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.live

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[LiveTask]:
        return iter(self.live.values())

    def add(self, task: LiveTask) -> None:
        self.live[task.id] = task

    def remove(self, task_id: str) -> None:
        self.live.pop(task_id, None)

    def role_of(self, task: LiveTask) -> str:
        return ROLE_PROCESS if self._app.tasks[task.name].process else ROLE_WORKER

    def queued_count(self) -> int:
        """Unlocked tasks waiting in memory for an actor."""
        return len(self.ready[ROLE_WORKER]) + len(self.ready[ROLE_PROCESS])

    def queued_at(self, priority: int) -> int:
        """Unlocked tasks of one priority waiting in memory (the backlog's window is per priority)."""
        return self.ready[ROLE_WORKER].count(priority) + self.ready[ROLE_PROCESS].count(priority)

    def want_clock(self) -> None:
        self.clock_wanted = True

    # ---- queueing ----------------------------------------------------------------------------
    def queue(self, task: LiveTask, run_at: float | None) -> None:
        """Queue a task now, or when ``run_at`` comes; a SCHEDULED one waits for the clock."""
        if task.state == SCHEDULED:
            self.clock_wanted = True
            return
        delay = (run_at - time.time()) if run_at else 0.0
        if delay > 0:
            self._timers.add(delay, self.due, task.id)
        else:
            self.due(task.id)

    def due(self, task_id: str) -> None:
        task = self.live.get(task_id)
        if task is not None and task.state in (QUEUED, SCHEDULED) and not task.blocked:
            task.state = QUEUED
            task.since = time.monotonic()
            self._queue_of(task).append(task_id, task.priority)

    def put_back(self, task: LiveTask) -> None:
        """A Run given back before it began, or a task a limit held back: to the head of its
        priority in its queue."""
        task.state = QUEUED
        task.actor = None
        self._queue_of(task).appendleft(task.id, task.priority)

    def promote(self, task_ids: Iterable[str]) -> None:
        """The key's owner let these blocked tasks go (their holder ended)."""
        for task_id in task_ids:
            task = self.live.get(task_id)
            if task is not None and task.blocked:
                task.blocked = False
                self.queue(task, task.run_at)

    def _queue_of(self, task: LiveTask) -> ReadyQueue:
        return self.slot_ready[task.owner] if task.owner else self.ready[self.role_of(task)]

    # ---- lock keys ---------------------------------------------------------------------------
    def abandon_key(self, task: LiveTask) -> None:
        """A locked task's attempt was abandoned but its body runs on: it holds its key until then."""
        self.abandoned_keys[task.id] = task

    def unwound(self, task_id: str) -> LiveTask | None:
        """The abandoned body of ``task_id`` stopped: its key is free (returns the task, if kept)."""
        return self.abandoned_keys.pop(task_id, None)

    def add_slot(self, slot: str) -> None:
        self.slot_ready.setdefault(slot, ReadyQueue())

    def reassign_owners(self, slots: Iterable[str], owner_of: Callable[[str, str], str]) -> None:
        """The pools changed: every locked task gets its key's new owner, and the queued ones
        move to that owner's queue (in their order)."""
        queued = [task_id for queue in self.slot_ready.values() for task_id in queue]
        self.slot_ready = {slot: ReadyQueue() for slot in slots}
        for task in [*self.live.values(), *self.abandoned_keys.values()]:
            if task.lock_key is not None:
                task.owner = owner_of(task.name, task.lock_key)
        for task_id in queued:
            moved = self.live.get(task_id)
            if moved is not None and moved.owner is not None:
                self.slot_ready[moved.owner].append(task_id, moved.priority)

    # ---- status ------------------------------------------------------------------------------
    def keys_by_owner(self) -> collections.Counter[str]:
        """Live lock keys per owner slot (a blocked task shares its holder's key)."""
        return collections.Counter(t.owner for t in self.live.values() if t.owner and not t.blocked)

    def states(self) -> collections.Counter[str]:
        """Live tasks in memory per state (scheduled ones live in the store only: not counted)."""
        return collections.Counter(t.state for t in self.live.values() if t.state != SCHEDULED)
