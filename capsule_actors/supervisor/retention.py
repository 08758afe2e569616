"""Retention: the event log is trimmed by age and size, finished tasks by the app's result_ttl.

Pruning runs in small batches (``PRUNE_BATCH`` rows per store call) for at most
``PRUNE_BUDGET`` of a turn, so no turn waits longer than that on it. While expired rows remain,
the next step is due at once (the next turn, after whatever messages are waiting), so the rate
follows the intake; once none remain, it looks again ``PRUNE_CHECK`` later.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..app import App
    from ..store import TaskStore
    from .cluster import Membership
    from .timers import Timers

log = logging.getLogger("capsule_actors.supervisor")

EVENT_RETENTION = 7 * 24 * 3600.0  # events older than this are pruned (task records are kept)
EVENT_MAX_ROWS = 1_000_000  # and at most this many events are kept
PRUNE_BATCH = 64  # rows per store call (64 finished tasks with 3 events each: about 0.5 ms here)
PRUNE_BUDGET = 0.004  # seconds of a turn that pruning may take
PRUNE_CHECK = 1.0  # seconds between looks when nothing is left to prune


class Retention:
    """A timer that prunes old events and expired results; counts what it pruned."""

    def __init__(self, app: App, store: TaskStore, timers: Timers, membership: Membership | None = None) -> None:
        self._app = app
        self._membership = membership  # in a cluster, the member with the clock prunes for all
        self._store = store
        self._timers = timers
        self.pruned: collections.Counter[str] = collections.Counter()  # finished tasks removed, by state

    def prune(self) -> None:
        """This turn's share: batches until none is full or the budget is spent."""
        deadline = time.monotonic() + PRUNE_BUDGET
        more = self._membership is None or self._membership.clock
        while more and time.monotonic() < deadline:
            more = self._batch()
        self._timers.add(0.0 if more else PRUNE_CHECK, self.prune)

    def _batch(self) -> bool:
        """One batch of events and one of expired tasks; True when either was full (more wait)."""
        now = time.time()
        events = self._store.prune_events(now - EVENT_RETENTION, EVENT_MAX_ROWS, PRUNE_BATCH)
        ttl = self._app.result_ttl
        tasks = self._store.prune_finished(now - ttl, PRUNE_BATCH) if ttl is not None else {}
        self.pruned.update(tasks)
        if events or tasks:
            log.debug("retention: removed %d old events and %d finished tasks", events, sum(tasks.values()))
        return events == PRUNE_BATCH or sum(tasks.values()) == PRUNE_BATCH
