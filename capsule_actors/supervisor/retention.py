"""Retention: the event log is trimmed by age and size, finished tasks by the app's result_ttl."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..app import App
    from ..store import TaskStore
    from .attempts import Attempts
    from .timers import Timers

log = logging.getLogger("capsule_actors.supervisor")

EVENT_RETENTION = 7 * 24 * 3600.0  # events older than this are pruned (task records are kept)
EVENT_MAX_ROWS = 1_000_000  # and at most this many events are kept
EVENT_PRUNE_INTERVAL = 60.0


class Retention:
    """A timer that prunes old events and expired results."""

    def __init__(self, app: App, store: TaskStore, attempts: Attempts, timers: Timers) -> None:
        self._app = app
        self._store = store
        self._attempts = attempts
        self._timers = timers

    def prune(self) -> None:
        removed = self._store.prune_events(time.time() - EVENT_RETENTION, EVENT_MAX_ROWS)
        ttl = self._app.result_ttl
        if ttl is not None:
            pruned = self._store.prune_finished(time.time() - ttl)
            if pruned:  # rare: recount the finished tasks rather than track each pruned state
                self._attempts.count_finished()
            removed += pruned
        if removed:
            log.info("retention: removed %d old events and finished tasks", removed)
        self._timers.add(max(0.5, min(EVENT_PRUNE_INTERVAL, ttl or EVENT_PRUNE_INTERVAL)), self.prune)
