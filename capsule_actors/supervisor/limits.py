"""Limits: the rate and concurrency limits of the tasks that declare them, decided where every
attempt starts (the supervisor's dispatch), so they hold across every actor and worker node.

A task over its budget is held back here (still QUEUED) and goes back to the head of its
priority in its ready queue when its budget has room: the dispatcher moves on to other work
meanwhile, so no actor idles while something else could run. Tasks that declare no limit never
get here (``gated``: one set lookup per start)."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from ..states import QUEUED
from .tasks import ReadyQueue

if TYPE_CHECKING:
    from ..app import App
    from .tasks import LiveTask, TaskTable
    from .timers import Timers

# Seconds added to each rate window: a start is decided here but recorded by the actor a moment
# later, and that moment varies (a loaded machine); with this slack no window of the actors' own
# start times holds more than the limit either. It costs a 100/s limit about 5 % of its rate.
RATE_SLACK = 0.05

Gate = tuple[str, str, str | None]  # ("c", task name, None): concurrency; ("r", name, key): a rate budget


class Limits:
    """Owns each rate budget's window of start times, the attempts running of each task with a
    concurrency limit, and the tasks held back by either."""

    def __init__(self, app: App, tasks: TaskTable, timers: Timers) -> None:
        self._tasks = tasks
        self._timers = timers
        self._rates = {name: t.rate_limit for name, t in app.tasks.items() if t.rate_limit is not None}
        self._caps = {name: t.concurrency for name, t in app.tasks.items() if t.concurrency is not None}
        self.gated = frozenset(self._rates) | frozenset(self._caps)  # names that must ask admit()
        self._windows: dict[Gate, collections.deque[float]] = {}  # monotonic start times in the window
        self._running: dict[str, set[str]] = {}  # task name -> ids with an attempt out
        self._held: dict[Gate, ReadyQueue] = {}
        self._waking: set[Gate] = set()  # rate gates with a release timer pending
        self.rate_limited_until: dict[str, float] = {}  # task id -> wall time its budget has room

    def admit(self, task: LiveTask) -> bool:
        """May ``task`` start now? Yes: its start is counted. No: it is held back until its
        budget has room (then put back in its queue)."""
        name = task.name
        cap = self._caps.get(name)
        if cap is not None and len(self._running.get(name, ())) >= cap:
            self._hold(("c", name, None), task)
            return False
        rate = self._rates.get(name)
        if rate is not None:
            gate: Gate = ("r", name, task.rate_key)
            window = self._windows.setdefault(gate, collections.deque())
            now = time.monotonic()
            self._expire(window, now, rate.period)
            if len(window) >= rate.count:
                self._hold(gate, task)
                self._wake_at(gate, window[0] + rate.period + RATE_SLACK - now)
                return False
            window.append(now)
            self.rate_limited_until.pop(task.id, None)
        if cap is not None:
            self._running.setdefault(name, set()).add(task.id)
        return True

    def ended(self, task: LiveTask) -> None:
        """An attempt of ``task`` is over (or was given back, or the task ended): its
        concurrency slot is free."""
        if task.name not in self.gated:
            return
        self.rate_limited_until.pop(task.id, None)
        running = self._running.get(task.name)
        if running is not None and task.id in running:
            running.discard(task.id)
            self._release(("c", task.name, None), 1)

    def held_count(self) -> int:
        return sum(len(queue) for queue in self._held.values())

    @staticmethod
    def _expire(window: collections.deque[float], now: float, period: float) -> None:
        while window and window[0] <= now - period - RATE_SLACK:
            window.popleft()

    def _hold(self, gate: Gate, task: LiveTask) -> None:
        queue = self._held.get(gate)
        if queue is None:
            queue = self._held[gate] = ReadyQueue()
        queue.append(task.id, task.priority)

    def _wake_at(self, gate: Gate, delay: float) -> None:
        """Release what the rate budget has room for after ``delay`` seconds (one timer a gate)."""
        if gate[0] != "r":
            return
        for task_id in self._held[gate]:
            self.rate_limited_until[task_id] = time.time() + delay
        if gate not in self._waking:
            self._waking.add(gate)
            self._timers.add(max(0.0, delay), self._on_window, gate)

    def _on_window(self, gate: Gate) -> None:
        self._waking.discard(gate)
        rate = self._rates[gate[1]]
        window = self._windows.get(gate, collections.deque())
        now = time.monotonic()
        self._expire(window, now, rate.period)
        self._release(gate, rate.count - len(window))
        if gate in self._held:  # more than the room: look again when the window moves on
            oldest = window[0] if window else now
            self._wake_at(gate, oldest + rate.period + RATE_SLACK - now)

    def _release(self, gate: Gate, room: int) -> None:
        """Put back up to ``room`` held tasks (the highest priority, the oldest first) at the head
        of their queues; the dispatcher admits them again."""
        queue = self._held.get(gate)
        if queue is None:
            return
        released: list[LiveTask] = []
        while queue and len(released) < room:
            task = self._tasks.get(queue.popleft())
            if task is not None and task.actor is None and task.state == QUEUED:  # not cancelled meanwhile
                released.append(task)
        if not queue:
            del self._held[gate]
        for task in reversed(released):  # each to its level's head: the first released ends up first
            self._tasks.put_back(task)
