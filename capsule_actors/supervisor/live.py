"""The supervisor's in-memory records: live tasks, and submits waiting for lock admissions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .children import ActorProcess


class LiveTask:
    """A task that is queued, scheduled or running: held in memory until it ends."""

    __slots__ = (
        "actor",
        "attempts",
        "blocked",
        "id",
        "lock_key",
        "name",
        "owner",
        "run_at",
        "session_id",
        "session_owner",
        "state",
        "waiters",
    )

    def __init__(
        self,
        task_id: str,
        name: str,
        state: str,
        attempts: int,
        lock_key: str | None,
        session_id: str | None,
        session_owner: str | None,
        owner: str | None = None,
        blocked: bool = False,
        run_at: float | None = None,
    ) -> None:
        self.id = task_id
        self.name = name
        self.state = state
        self.attempts = attempts
        self.lock_key = lock_key
        self.session_id = session_id
        self.session_owner = session_owner
        self.actor: ActorProcess | None = None
        self.waiters: list[tuple[bytes, int]] = []
        self.owner = owner  # the slot that owns the lock key (and runs the task)
        self.blocked = blocked  # queued behind the key's holder (on_conflict="queue")
        self.run_at = run_at


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
        self.results: list[list[Any] | None] = [None] * size
        self.remaining = 0
        self.fire = fire  # (schedule name, slot) when the clock fired it
        self.push = push or []  # per item: the client's request id for its outcome
