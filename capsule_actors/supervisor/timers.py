"""The supervisor's timers: callbacks due at a monotonic time, run by the loop between polls."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any


class Timers:
    """A heap of (due, seq, callback, args); the loop polls no longer than until the first one."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def add(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn, args))

    def next_due(self) -> float | None:
        """The monotonic time the first timer is due (None: no timer)."""
        return self._heap[0][0] if self._heap else None

    def run_due(self) -> None:
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, fn, args = heapq.heappop(heap)
            fn(*args)
