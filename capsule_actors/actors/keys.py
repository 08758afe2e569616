"""The owner actor's admission table: at most one live task per lock key, race-free by design.

Only the actor that owns a key (see ``supervisor/router.py``) ever decides about it, and it
decides one request at a time on its own loop, so two submits of one key can never both win.
Every decision is idempotent by task id, so a request resent after a restart gets the same answer.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

VERDICTS = ("run", "queue", "join", "reject")


class KeyTable:
    """key -> the live task holding it, and the tasks queued behind it in submit order."""

    def __init__(self) -> None:
        self.holder: dict[str, str] = {}
        self.waiting: dict[str, collections.deque[str]] = {}

    def rebuild(self, rows: Iterable[tuple[str, list[str]]]) -> list[str]:
        """Load ``(key, [holder, *queued])`` rows read from the store; return the holders, which
        may run (a queued task whose holder ended while this actor was down is one of them)."""
        self.holder.clear()
        self.waiting.clear()
        for key, ids in rows:
            if not ids:
                continue
            self.holder[key] = ids[0]
            if len(ids) > 1:
                self.waiting[key] = collections.deque(ids[1:])
        return list(self.holder.values())

    def admit(self, task_id: str, key: str, policy: str) -> tuple[str, str]:
        """Decide one submit: (verdict, id of the task holding the key)."""
        held_by = self.holder.get(key)
        if held_by is None:
            self.holder[key] = task_id
            return "run", task_id
        if held_by == task_id:
            return "run", task_id
        queue = self.waiting.get(key)
        if queue is not None and task_id in queue:
            return "queue", held_by
        if policy == "join":
            return "join", held_by
        if policy == "reject":
            return "reject", held_by
        self.waiting.setdefault(key, collections.deque()).append(task_id)
        return "queue", held_by

    def release(self, task_id: str, key: str) -> str | None:
        """``task_id`` ended: free its key, or drop it from the queue. Return the task that now
        holds the key and may run, if any."""
        queue = self.waiting.get(key)
        if self.holder.get(key) != task_id:
            if queue is not None and task_id in queue:
                queue.remove(task_id)
                if not queue:
                    del self.waiting[key]
            return None
        if not queue:
            del self.holder[key]
            return None
        nxt = queue.popleft()
        if not queue:
            del self.waiting[key]
        self.holder[key] = nxt
        return nxt

    def __len__(self) -> int:
        return len(self.holder)
