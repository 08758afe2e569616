"""Sessions: who a task works for, and how it talks back (reply, notify, stream, progress, db).

Inside a task with a bound session every call becomes a TaskEvent, delivered in order to
``h.events()`` and to ``app.subscribe(session_id)``. The calls work from async tasks, plain
``def`` tasks (thread pool) and ``process=True`` tasks alike: each sends at once and returns an
awaitable that is already complete, so ``await session.reply(x)`` and ``session.reply(x)`` both
work. ``session.db`` is a small JSON key-value store in the runtime's SQLite file.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import CapsuleError, ConfigError, SerializationError

T = TypeVar("T")
_LOCK_WAIT = 30.0  # seconds a local session.db operation waits for SQLite's write lock

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("capsule_session", default=None)

DEFAULT_OWNER_ID = "owner"
NOTIFY_LEVELS = ("debug", "info", "success", "warning", "error")
EVENT_KINDS = ("reply", "notify", "stream", "progress", "card")


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
        """Emit a task card for ``handle``; later state changes update the same card id."""
        return self._emit("card", {"card": handle.id, "task_id": handle.id, "name": handle.name})

    # ---- state -------------------------------------------------------------------------------
    @property
    def db(self) -> SessionDB:
        """This session's persistent key-value store (JSON values), shared by all its tasks."""
        state_dir, remote = self.__dict__.get("_state_dir"), self.__dict__.get("_remote")
        if state_dir is None and remote is None:
            raise ConfigError(f"session {self.id!r} has no runtime: use app.session({self.id!r}).db")
        return SessionDB(Path(state_dir) if state_dir is not None else None, self.id, remote)


def bound_session(
    session_id: str, owner: str | None, channel: EventChannel | None, state_dir: Path | None, remote: Any = None
) -> Session:
    """A Session wired to a task's event channel and the runtime's store (``state_dir``), or on a
    worker node to the supervisor (``remote``: the App, whose connection reaches it)."""
    session = Session(session_id, owner)
    object.__setattr__(session, "_channel", channel)
    object.__setattr__(session, "_state_dir", state_dir)
    object.__setattr__(session, "_remote", remote)
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
    """Dict-like JSON store of one session, in the runtime's capsule.db.

    In the supervisor's machine it reads and writes capsule.db directly (each write is its own
    transaction; ``update`` holds SQLite's write lock while ``fn`` runs). In a task on a worker
    node, where that file is not, each operation is a request to the supervisor (``SessionKV``),
    and ``update`` is a compare-and-set loop: both lose no concurrent update.
    """

    _local = threading.local()
    _MISSING = object()

    def __init__(self, state_dir: Path | None, session_id: str, remote: Any = None) -> None:
        self.path = state_dir / "capsule.db" if state_dir is not None else None
        self.session_id = session_id
        self._remote = remote  # an App whose connection() reaches the supervisor

    def _db(self) -> sqlite3.Connection:
        assert self.path is not None
        conns: dict[Path, sqlite3.Connection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(self.path)
        if conn is None:
            if not self.path.exists():
                raise ConfigError(f"no task store at {str(self.path)!r}: start the runtime once first")
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=0.0)
            conn.execute("PRAGMA busy_timeout=0")  # _locally retries, more often than SQLite would
            conns[self.path] = conn
        return conn

    def _locally(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """``op(db)`` on the local capsule.db, tried again every 0.2-2 ms while the supervisor
        holds the write lock (for up to 30 s). SQLite's own busy handler sleeps up to 100 ms
        between tries; the supervisor's write transactions are short but frequent under load, so
        a writer could lose the race for a tenth of a second or more."""
        db = self._db()
        deadline = time.monotonic() + _LOCK_WAIT
        delay = 0.0002
        while True:
            try:
                return op(db)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def _ask(self, op: str, key: str = "", value: str | None = None, expected: str | None = None) -> Any:
        from . import messages

        body, _ = self._remote.connection().call(
            lambda req: messages.SessionKV(req, self.session_id, op, key, value, expected)
        )
        return body

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, self._MISSING)
        if value is self._MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        key = _key(key)
        text = self._ask("get", key) if self._remote else self._locally(lambda db: kv_get(db, self.session_id, key))
        return json.loads(text) if text is not None else default

    def __setitem__(self, key: str, value: Any) -> None:
        key, text = _key(key), _json(value)
        if self._remote:
            self._ask("set", key, text)
        else:
            self._locally(lambda db: kv_set(db, self.session_id, key, text))

    def __delitem__(self, key: str) -> None:
        key = _key(key)
        if not (
            self._ask("del", key) if self._remote else self._locally(lambda db: kv_delete(db, self.session_id, key))
        ):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, self._MISSING) is not self._MISSING

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, _ in self._rows()])

    def __len__(self) -> int:
        return len(self._rows())

    def _rows(self) -> list[tuple[str, str]]:
        if self._remote:
            return [(k, v) for k, v in self._ask("items")]
        return self._locally(lambda db: kv_items(db, self.session_id))

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, json.loads(v)) for k, v in self._rows()]

    def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value with ``fn(old)`` (``old`` is ``default`` when absent).
        Keep ``fn`` quick and free of side effects: it may run again when another writer won."""
        key = _key(key)
        if self._remote:
            for _ in range(1000):
                old = self._ask("get", key)
                new = fn(json.loads(old) if old is not None else default)
                if self._ask("cas", key, _json(new), old):
                    return new
            raise CapsuleError(f"session.db.update({key!r}): 1000 attempts lost to concurrent writers")

        def replace(db: sqlite3.Connection) -> Any:
            db.execute("BEGIN IMMEDIATE")  # when the lock is taken, nothing began: tried again
            try:
                old = kv_get(db, self.session_id, key)
                new = fn(json.loads(old) if old is not None else default)
                kv_set(db, self.session_id, key, _json(new))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return new

        return self._locally(replace)

    def increment(self, key: str, by: int | float = 1) -> int | float:
        """Atomically add ``by`` to a number (0 when absent) and return the new value."""
        return self.update(key, lambda old: (old or 0) + by)  # type: ignore[no-any-return]


# ---- the session_kv table: one copy of the SQL, for SessionDB here and the supervisor's SessionKV
def kv_get(db: sqlite3.Connection, session_id: str, key: str) -> str | None:
    row = db.execute("SELECT value FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).fetchone()
    return row[0] if row else None


def kv_set(db: sqlite3.Connection, session_id: str, key: str, text: str) -> None:
    db.execute(
        "INSERT INTO session_kv(session_id, key, value, updated_at) VALUES (?,?,?,?) "
        "ON CONFLICT(session_id, key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (session_id, key, text, time.time()),
    )


def kv_delete(db: sqlite3.Connection, session_id: str, key: str) -> bool:
    return db.execute("DELETE FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).rowcount > 0


def kv_items(db: sqlite3.Connection, session_id: str) -> list[tuple[str, str]]:
    rows = db.execute("SELECT key, value FROM session_kv WHERE session_id=? ORDER BY key", (session_id,))
    return [(k, v) for k, v in rows]


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
