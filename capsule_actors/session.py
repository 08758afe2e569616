"""Sessions: who a task works for, reachable anywhere inside the task as current_session()."""

from __future__ import annotations

import contextvars
import dataclasses

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("capsule_session", default=None)

DEFAULT_OWNER_ID = "owner"


@dataclasses.dataclass(frozen=True)
class Session:
    """Identifies a chat or user; bound to a task with ``.submit(..., session=...)``."""

    id: str
    owner: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            from .errors import ConfigError

            raise ConfigError(f"Session id must be a non-empty string, got {self.id!r}")


def current_session() -> Session | None:
    """The session bound to the running task, or None outside a task or when unbound."""
    return _current.get()


def bind_session(session: Session | None) -> contextvars.Token[Session | None]:
    """Bind ``session`` for the current context (one asyncio task or one thread-pool call)."""
    return _current.set(session)
