"""Sessions: who a task works for, and how it talks back (reply, notify, stream, progress, db).

Inside a task with a bound session every call becomes a TaskEvent, delivered in order to
``h.events()`` and to ``app.subscribe(session_id)``. The calls work from async tasks, plain
``def`` tasks (thread pool) and ``process=True`` tasks alike: each sends at once and returns an
awaitable that is already complete, so ``await session.reply(x)`` and ``session.reply(x)`` both
work. ``session.db`` is a small JSON key-value store kept by the runtime's store, reached through
the supervisor (its only writer).
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .errors import CapsuleError, ConfigError, SerializationError

if TYPE_CHECKING:
    from .client import ClientSource

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("capsule_session", default=None)

DEFAULT_OWNER_ID = "owner"
NOTIFY_LEVELS = ("debug", "info", "success", "warning", "error")


class EventChannel(Protocol):
    """How a bound session reaches the supervisor (implemented by the actor running the task)."""

    def emit(self, kind: str, data: dict[str, Any]) -> None: ...


class _Sent:
    """An awaitable that is already complete: the event was sent when the method was called."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


_SENT = _Sent()


@dataclasses.dataclass(frozen=True)
class Session:
    """Identifies a chat or user; bound to a task with ``.submit(..., session=...)``."""

    id: str
    owner: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"Session id must be a non-empty string, got {self.id!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Session, (self.id, self.owner))  # the binding to a task never travels

    # ---- talking back (inside a task) --------------------------------------------------------
    def _emit(self, kind: str, data: dict[str, Any]) -> _Sent:
        channel: EventChannel | None = self.__dict__.get("_channel")
        if channel is None:
            raise ConfigError(
                f"session {self.id!r} is not bound to a running task: reply/notify/stream/progress "
                "work inside a task submitted with session=..."
            )
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"session {kind} data must be JSON-serializable: {exc}") from None
        channel.emit(kind, data)
        return _SENT

    def reply(self, text: str) -> _Sent:
        """Send a chat reply to the session's user."""
        return self._emit("reply", {"text": _text(text)})

    def notify(self, text: str, level: str = "info") -> _Sent:
        """Send a notification; ``level`` is one of debug, info, success, warning, error."""
        if level not in NOTIFY_LEVELS:
            raise ConfigError(f"notify level={level!r}: expected one of {NOTIFY_LEVELS}")
        return self._emit("notify", {"text": _text(text), "level": level})

    def report_progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the task is, 0.0 to 1.0 (shown by TaskInfo.progress and task cards)."""
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"progress fraction={fraction!r}: expected a number from 0.0 to 1.0")
        self._emit("progress", {"fraction": float(fraction), "message": message})

    def stream(self) -> SessionStream:
        """``async with session.stream() as s: await s.write(chunk)`` (or plain ``with``)."""
        return SessionStream(self)

    def show_task(self, handle: Any) -> _Sent:
        """Emit a task card for ``handle`` to this session; later state changes update the same
        card id. Inside a task of this session the card goes with the task's other events; from
        app code (any session) the supervisor sends it, after one round trip to it."""
        if self.__dict__.get("_channel") is not None:
            return self._emit("card", {"card": handle.id, "task_id": handle.id, "name": handle.name})
        from . import messages

        source: ClientSource | None = self.__dict__.get("_runtime") or getattr(handle, "_app", None)
        if source is None:
            raise ConfigError(f"show_task({handle!r}): expected a TaskHandle")
        source.client().call(lambda req: messages.ShowCard(req, self.id, str(handle.id)))
        return _SENT

    # ---- state -------------------------------------------------------------------------------
    @property
    def db(self) -> SessionDB:
        """This session's persistent key-value store (JSON values), shared by all its tasks."""
        source: ClientSource | None = self.__dict__.get("_runtime")
        if source is None:
            raise ConfigError(f"session {self.id!r} has no runtime: use app.session({self.id!r}).db")
        return SessionDB(self.id, source)


def bound_session(
    session_id: str, owner: str | None, channel: EventChannel | None, runtime: ClientSource | None
) -> Session:
    """A Session wired to a task's event channel (``channel``) and to the supervisor that keeps
    its ``db`` (``runtime``: an App, whose client reaches it)."""
    session = Session(session_id, owner)
    object.__setattr__(session, "_channel", channel)
    object.__setattr__(session, "_runtime", runtime)
    return session


def _text(text: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"expected text (str), got {type(text).__name__}: {text!r}")
    return text


_stream_ids = itertools.count(1)


class SessionStream:
    """A streamed message: chunks in order, then a final marker."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.id = f"{time.time_ns():x}-{next(_stream_ids)}"
        self.closed = False

    def write(self, chunk: str) -> _Sent:
        if self.closed:
            raise ConfigError("write() on a finished stream")
        return self.session._emit("stream", {"stream": self.id, "chunk": _text(chunk), "final": False})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.session._emit("stream", {"stream": self.id, "chunk": "", "final": True})

    async def __aenter__(self) -> SessionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionDB:
    """Dict-like JSON store of one session, kept in the runtime's store.

    Every operation is a request to the supervisor (``SessionKV``), from app code, a task on this
    host or one on a worker node alike: the supervisor writes it in its turn's transaction and
    answers after the commit, so it is the store's only writer. ``update`` is a compare-and-set
    loop: no concurrent update is lost.
    """

    _MISSING = object()

    def __init__(self, session_id: str, runtime: ClientSource) -> None:
        self.session_id = session_id
        self._runtime = runtime

    def _ask(self, op: str, key: str = "", value: str | None = None, expected: str | None = None) -> Any:
        from . import messages

        body, _ = self._runtime.client().call(
            lambda req: messages.SessionKV(req, self.session_id, op, key, value, expected)
        )
        return body

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, self._MISSING)
        if value is self._MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        text = self._ask("get", _key(key))
        return json.loads(text) if text is not None else default

    def __setitem__(self, key: str, value: Any) -> None:
        self._ask("set", _key(key), _json(value))

    def __delitem__(self, key: str) -> None:
        key = _key(key)
        if not self._ask("del", key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, self._MISSING) is not self._MISSING

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, _ in self._rows()])

    def __len__(self) -> int:
        return len(self._rows())

    def _rows(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self._ask("items")]

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, json.loads(v)) for k, v in self._rows()]

    def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value with ``fn(old)`` (``old`` is ``default`` when absent).
        Keep ``fn`` quick and free of side effects: it may run again when another writer won."""
        key = _key(key)
        for _ in range(1000):
            old = self._ask("get", key)
            new = fn(json.loads(old) if old is not None else default)
            if self._ask("cas", key, _json(new), old):
                return new
        raise CapsuleError(f"session.db.update({key!r}): 1000 attempts lost to concurrent writers")

    def increment(self, key: str, by: int | float = 1) -> int | float:
        """Atomically add ``by`` to a number (0 when absent) and return the new value."""
        return self.update(key, lambda old: (old or 0) + by)  # type: ignore[no-any-return]


def _key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"session.db keys are non-empty strings, got {key!r}")
    return key


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"session.db values must be JSON-serializable: {exc}") from None


def current_session() -> Session | None:
    """The session bound to the running task, or None outside a task or when unbound."""
    return _current.get()


def bind_session(session: Session | None) -> contextvars.Token[Session | None]:
    """Bind ``session`` for the current context (one asyncio task or one thread-pool call)."""
    return _current.set(session)
