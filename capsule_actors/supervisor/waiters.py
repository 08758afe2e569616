"""The clients waiting for something: a task's outcome (``Wait``, or a submit's push), or events
(long polls of ``h.events()``, ``app.subscribe()`` and the board's feed).

``Waiters`` alone keeps them. An outcome wait is kept by task id whether the task is in memory or
in the store only (delayed, or in the backlog), and answered when the task finishes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import messages
from ..states import LIVE
from ..store.base import PollKey, events_page

if TYPE_CHECKING:
    from ..store import TaskStore
    from .outbox import Outbox
    from .tasks import TaskTable


class Waiters:
    """Outcome waits and event long polls, each known by the client's (identity, request id)."""

    def __init__(self, store: TaskStore, tasks: TaskTable, outbox: Outbox) -> None:
        self._store = store
        self._tasks = tasks
        self._outbox = outbox
        self._by_task: dict[str, list[tuple[bytes, int]]] = {}
        self._index: dict[tuple[bytes, int], str] = {}  # (client, req) -> the task or poll key it waits on
        self._polls: dict[PollKey, list[tuple[bytes, int, int]]] = {}

    # ---- outcomes ----------------------------------------------------------------------------
    def wait(self, task_id: str, ident: bytes, req: int) -> None:
        """Answer ``req`` of ``ident`` when the task ends."""
        self._by_task.setdefault(task_id, []).append((ident, req))
        self._index[(ident, req)] = task_id

    def settle(self, task_id: str, outcome: messages.Outcome, result: bytes) -> None:
        """The task ended: answer everyone waiting for it."""
        waiting = self._by_task.pop(task_id, None)
        if not waiting:
            return
        body = outcome.to_wire()
        for ident, req in waiting:
            self._index.pop((ident, req), None)
            self._outbox.reply(ident, req, True, body, [result])

    def waited(self) -> list[str]:
        """The tasks someone waits for."""
        return list(self._by_task)

    def settle_stored(self, task_id: str) -> None:
        """Answer the waits on a task that ended elsewhere (on another cluster member), from the
        store; nothing when it has not ended (or is not waited for)."""
        if task_id not in self._by_task:
            return
        outcome = self._store.outcome(task_id)
        if outcome is None or outcome[0] in LIVE:
            return
        state, result, error = outcome
        self.settle(task_id, messages.Outcome(state, *error), result or b"")

    def forget(self, ident: bytes, req: int) -> None:
        """The client gave up on ``req`` (its wait timed out, or its event loop cancelled it)."""
        task_id = self._index.pop((ident, req), None)
        waiting = self._by_task.get(task_id) if task_id is not None else None
        if waiting is not None:
            waiting[:] = [w for w in waiting if w != (ident, req)]
            if not waiting:
                del self._by_task[task_id]  # type: ignore[arg-type]
        for polls in self._polls.values():
            polls[:] = [p for p in polls if (p[0], p[1]) != (ident, req)]

    # ---- events ------------------------------------------------------------------------------
    @property
    def polling(self) -> bool:
        return bool(self._polls)

    def poll(self, ident: bytes, req: int, key: PollKey, after: int) -> None:
        """Answer with the events after ``after`` now, or hold the request until there are some."""
        if not self._send_events(ident, req, key, after):
            self._polls.setdefault(key, []).append((ident, req, after))
            self._index[(ident, req)] = key[1]

    def answer_polls(self) -> None:
        """After a commit: the polls whose task, session or feed got events since the last one."""
        tasks, sessions, any_event = self._store.take_touched()
        if not self._polls:
            return
        touched = {("t", t) for t in tasks} | {("s", s) for s in sessions} | ({("a", "")} if any_event else set())
        self._repoll(touched & self._polls.keys())

    def recheck_polls(self) -> None:
        """Every held poll looks again (another cluster member wrote events)."""
        self._repoll(list(self._polls))

    def _repoll(self, keys: Iterable[PollKey]) -> None:
        """The polls held on ``keys`` look again: answered, or held again."""
        for key in keys:
            for ident, req, after in self._polls.pop(key, []):
                self._index.pop((ident, req), None)
                self.poll(ident, req, key, after)

    def _send_events(self, ident: bytes, req: int, key: PollKey, after: int) -> bool:
        """Reply with events after ``after`` if there are any (or the task has ended)."""
        body = events_page(self._store, key, after, held=key[0] == "t" and key[1] in self._tasks)
        if body is None:
            return False
        self._outbox.reply(ident, req, True, body)
        return True
