"""The embedded store: one SQLite file (WAL) in the state directory, written by the supervisor only.

The supervisor's loop opens one transaction per turn and commits it before sending any reply, so
every acknowledgement follows a commit and concurrent submits share one commit (group commit).
``synchronous=NORMAL`` in WAL mode: a process crash (supervisor, actor, client) loses nothing
committed; a power loss or kernel crash can lose the last commits. Other processes (the board,
the clock actor) read through ``SQLiteReader``: read-only connections that WAL lets run beside
the writer. ``session.db`` reaches this file through the supervisor too, so it has one writer.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import StateDirError
from ..states import CANCELLED, FAILED, LIVE, QUEUED, RUNNING, SCHEDULED, SUCCEEDED, TaskState
from .base import Error, NewTask, StoredTask, StoreReader, TaskStore

DB_FILE = "capsule.db"
SCHEMA_VERSION = 1
# Every index costs page writes on the hot path (each submit, dispatch and result): keep few.
# Submit order is the rowid (newest first = ORDER BY rowid DESC), so created_at needs none.
_LIVE_SQL = "('QUEUED','SCHEDULED','RUNNING')"
_TERMINAL_SQL = "('SUCCEEDED','FAILED','CANCELLED')"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    lock_key TEXT,
    session_id TEXT,
    session_owner TEXT,
    args BLOB,
    result BLOB,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    run_at REAL,
    progress REAL,
    slot TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    session_id TEXT,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events(task_id, seq);
CREATE INDEX IF NOT EXISTS events_session ON events(session_id, seq) WHERE session_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS session_kv (
    session_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE INDEX IF NOT EXISTS tasks_scheduled ON tasks(run_at) WHERE state='SCHEDULED';
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    tz TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_slot REAL
);
CREATE TABLE IF NOT EXISTS cards (
    task_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (task_id, session_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

INFO_FIELDS = (
    "id",
    "name",
    "state",
    "attempts",
    "lock_key",
    "session_id",
    "created_at",
    "started_at",
    "finished_at",
    "error_type",
    "error_message",
    "progress",
    "slot",
)
_INFO = ", ".join(INFO_FIELDS)
_STORED = "rowid, id, name, state, lock_key, session_id, session_owner, attempts, run_at, slot"


def _stored(row: tuple[Any, ...]) -> StoredTask:
    return StoredTask(row[0], row[1], row[2], TaskState(row[3]), *row[4:])


def _info(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(INFO_FIELDS, row))


def _check_version() -> None:
    if sqlite3.sqlite_version_info < (3, 35):
        raise StateDirError(
            f"SQLite {sqlite3.sqlite_version} is too old: capsule_actors needs 3.35 or newer "
            "(UPDATE ... RETURNING); use a Python built against a newer libsqlite3"
        )


class SQLiteStore(TaskStore):
    """``capsule.db`` for the supervisor's loop thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _check_version()
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")  # a reader's checkpoint can hold the file briefly
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # the supervisor checkpoints after replying
            self.db.executescript(_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            found = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        except sqlite3.Error as exc:
            raise StateDirError(f"cannot open task store {str(path)!r}: {exc}") from None
        if found > SCHEMA_VERSION:
            self.db.close()
            raise StateDirError(
                f"task store {str(path)!r} has schema version {found}, newer than this capsule_actors "
                f"knows ({SCHEMA_VERSION}): run the version that wrote it"
            )
        self._in_tx = False
        self.slot_pending = False
        self._committed_changes = 0
        self.commits = 0
        self._touched: set[str] = set()
        self._touched_sessions: set[str] = set()
        self._any_event = False
        self._cards: dict[str, set[str]] = {}  # task id -> sessions showing its card
        for task_id, session_id in self.db.execute(
            f"SELECT c.task_id, c.session_id FROM cards c JOIN tasks t ON t.id = c.task_id WHERE t.state IN {_LIVE_SQL}"
        ):
            self._cards.setdefault(task_id, set()).add(session_id)

    def close(self) -> None:
        self.db.close()

    # ---- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        if not self._in_tx:
            # IMMEDIATE: take the write lock now, so no later statement of the turn can find it taken
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False
            self.slot_pending = False
            self.commits += 1
            self._committed_changes = self.db.total_changes

    def dirty(self) -> bool:
        return self.db.total_changes != self._committed_changes

    def checkpoint_if_needed(self, every: int = 1000) -> None:
        """Copy the WAL back into the database every ``every`` commits (PASSIVE: never waits
        for readers). Called after the replies are sent, so no acknowledgement waits for a
        checkpoint (SQLite's own auto-checkpoint would run inside COMMIT)."""
        if self.commits >= every:
            self.commits = 0
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ---- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, rows: Iterable[NewTask]) -> list[tuple[str, int]]:
        new = []
        for row in rows:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO tasks(id, name, state, lock_key, session_id, session_owner, "
                "args, created_at, run_at) VALUES (?,?,?,?,?,?,?,?,?)",
                row,
            )
            if cur.rowcount:
                new.append((row.id, int(cur.lastrowid or 0)))
                self.add_event(row.id, row.session_id, "state", {"state": row.state, "attempt": 0, "name": row.name})
        return new

    def args(self, task_id: str) -> bytes:
        row = self.db.execute("SELECT args FROM tasks WHERE id=?", (task_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def mark_running(self, task_id: str, session_id: str | None, attempt: int, slot: str, now: float) -> bytes:
        row = self.db.execute(
            "UPDATE tasks SET state='RUNNING', attempts=?, slot=?, started_at=? WHERE id=? RETURNING args",
            (attempt, slot, now, task_id),
        ).fetchone()
        self.add_event(task_id, session_id, "state", {"state": RUNNING, "attempt": attempt, "slot": slot})
        return bytes(row[0]) if row and row[0] is not None else b""

    def finish(
        self,
        task_id: str,
        session_id: str | None,
        state: TaskState,
        result: bytes | None,
        error: Error | None,
        now: float,
    ) -> None:
        etype, emsg, tb = error or (None, None, None)
        self.db.execute(
            "UPDATE tasks SET state=?, result=?, error_type=?, error_message=?, traceback=?, "
            "finished_at=?, run_at=NULL WHERE id=?",
            (state, result, etype, emsg, tb, now, task_id),
        )
        data: dict[str, Any] = {"state": state}
        if etype:
            data["error"] = f"{etype}: {emsg}"
        self.add_event(task_id, session_id, "state", data)

    def requeue(
        self,
        task_id: str,
        session_id: str | None,
        run_at: float | None,
        error: Error | None,
        attempts: int | None = None,
    ) -> None:
        if attempts is not None:
            self.db.execute("UPDATE tasks SET attempts=? WHERE id=?", (attempts, task_id))
        if error:
            self.db.execute(
                "UPDATE tasks SET state='QUEUED', run_at=?, error_type=?, error_message=?, traceback=? WHERE id=?",
                (run_at, *error, task_id),
            )
        else:
            self.db.execute("UPDATE tasks SET state='QUEUED', run_at=? WHERE id=?", (run_at, task_id))
        data: dict[str, Any] = {"state": QUEUED, "retry_at": run_at}
        if error:
            data["error"] = f"{error[0]}: {error[1]}"
        self.add_event(task_id, session_id, "state", data)

    def set_progress(self, task_id: str, fraction: float) -> None:
        self.db.execute("UPDATE tasks SET progress=? WHERE id=?", (fraction, task_id))

    def add_event(self, task_id: str, session_id: str | None, kind: str, data: dict[str, Any]) -> int:
        cur = self.db.execute(
            "INSERT INTO events(task_id, session_id, kind, data, ts) VALUES (?,?,?,?,?)",
            (task_id, session_id, kind, json.dumps(data), time.time()),
        )
        self._touched.add(task_id)
        self._any_event = True
        if session_id is not None:
            self._touched_sessions.add(session_id)
        if task_id in self._cards and kind in ("state", "progress"):
            self._update_cards(task_id)
        return int(cur.lastrowid or 0)

    def show_card(self, task_id: str, session_id: str) -> dict[str, Any] | None:
        card = self._card(task_id)
        if card is None:
            return None
        self.db.execute("INSERT OR IGNORE INTO cards(task_id, session_id) VALUES (?,?)", (task_id, session_id))
        if card["state"] in LIVE:
            self._cards.setdefault(task_id, set()).add(session_id)
        return card

    def _card(self, task_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT name, state, attempts, progress, error_type, error_message, created_at, started_at, "
            "finished_at FROM tasks WHERE id=?",
            (task_id,),
        ).fetchone()
        if row is None:
            return None
        return {
            "card": task_id,
            "task_id": task_id,
            "name": row[0],
            "state": row[1],
            "attempts": row[2],
            "progress": row[3],
            "error": f"{row[4]}: {row[5]}" if row[4] else None,
            "created_at": row[6],
            "started_at": row[7],
            "finished_at": row[8],
        }

    def _update_cards(self, task_id: str) -> None:
        """A followed task changed: every session showing its card gets an update event."""
        card = self._card(task_id)
        if card is None:
            return
        card["update"] = True
        sessions = self._cards[task_id]
        if card["state"] not in LIVE:
            del self._cards[task_id]
        for session_id in sorted(sessions):
            self.add_event(task_id, session_id, "card", card)

    def take_touched(self) -> tuple[set[str], set[str], bool]:
        touched, self._touched = self._touched, set()
        sessions, self._touched_sessions = self._touched_sessions, set()
        any_event, self._any_event = self._any_event, False
        return touched, sessions, any_event

    # ---- reads -------------------------------------------------------------------------------
    def info(self, task_id: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {_INFO} FROM tasks WHERE id=?", (task_id,)).fetchone()
        return _info(row) if row else None

    def outcome(self, task_id: str) -> tuple[TaskState, bytes | None, list[str | None]] | None:
        row = self.db.execute(
            "SELECT state, result, error_type, error_message, traceback FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        if row is None:
            return None
        return TaskState(row[0]), row[1], [row[2], row[3], row[4]]

    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        if state:
            rows = self.db.execute(
                f"SELECT {_INFO} FROM tasks WHERE state=? ORDER BY rowid DESC LIMIT ?", (state, limit)
            )
        else:
            rows = self.db.execute(f"SELECT {_INFO} FROM tasks ORDER BY rowid DESC LIMIT ?", (limit,))
        return [_info(r) for r in rows]

    def live_tasks(self) -> Iterator[StoredTask]:
        rows = self.db.execute(f"SELECT {_STORED} FROM tasks WHERE state IN {_LIVE_SQL} ORDER BY rowid").fetchall()
        return (_stored(r) for r in rows)

    def backlog(self, after: int, limit: int) -> list[StoredTask]:
        rows = self.db.execute(
            f"SELECT {_STORED} FROM tasks WHERE rowid > ? AND state='QUEUED' AND lock_key IS NULL "
            "ORDER BY rowid LIMIT ?",
            (after, limit),
        )
        return [_stored(r) for r in rows]

    def live_locked(self) -> list[tuple[str, str, str]]:
        return [
            (r[0], r[1], r[2])
            for r in self.db.execute(
                f"SELECT id, name, lock_key FROM tasks WHERE state IN {_LIVE_SQL} AND lock_key IS NOT NULL "
                "ORDER BY rowid"
            )
        ]

    def live_task(self, task_id: str) -> StoredTask | None:
        row = self.db.execute(f"SELECT {_STORED} FROM tasks WHERE id=? AND state IN {_LIVE_SQL}", (task_id,)).fetchone()
        return _stored(row) if row else None

    def count_state(self, state: TaskState) -> int:
        return int(self.db.execute("SELECT count(*) FROM tasks WHERE state=?", (state,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT state, count(*) FROM tasks GROUP BY state")}

    def exists(self, task_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM tasks WHERE id=?", (task_id,)).fetchone() is not None

    def events_after(
        self, after: int, limit: int = 500, *, task_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        return _events_after(self.db, after, limit, task_id, session_id)

    def retry_row(self, task_id: str) -> tuple[Any, ...] | None:
        row = self.db.execute(
            "SELECT name, state, lock_key, session_id, session_owner, args FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        return tuple(row) if row else None

    # ---- retention ---------------------------------------------------------------------------
    def prune_events(self, before: float, keep_max: int) -> int:
        # events are appended in time order: the first young one bounds the old ones (no ts index)
        first = self.db.execute("SELECT seq FROM events WHERE ts >= ? ORDER BY seq LIMIT 1", (before,)).fetchone()
        if first is None:
            first = self.db.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()
        n = self.db.execute("DELETE FROM events WHERE seq < ?", (first[0],)).rowcount
        row = self.db.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep_max,)).fetchone()
        if row is not None:
            n += self.db.execute("DELETE FROM events WHERE seq <= ?", (row[0],)).rowcount
        return n

    def prune_finished(self, before: float, batch: int = 10_000) -> int:
        ids = [
            r[0]
            for r in self.db.execute(
                f"SELECT id FROM tasks WHERE state IN {_TERMINAL_SQL} AND finished_at < ? LIMIT ?", (before, batch)
            )
        ]
        for task_id in ids:
            self.db.execute("DELETE FROM events WHERE task_id=?", (task_id,))
            self.db.execute("DELETE FROM cards WHERE task_id=?", (task_id,))
            self.db.execute("DELETE FROM tasks WHERE id=?", (task_id,))
        return len(ids)

    # ---- schedules ---------------------------------------------------------------------------
    def register_schedules(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        for name, cron, tz in specs:
            self.db.execute(
                "INSERT INTO schedules(name, cron, tz, registered_at) VALUES (?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET cron=excluded.cron, tz=excluded.tz, "
                "registered_at=excluded.registered_at, last_slot=NULL "
                "WHERE schedules.cron != excluded.cron OR schedules.tz != excluded.tz",
                (name, cron, tz, now),
            )

    def schedule_marks(self) -> dict[str, dict[str, float | None]]:
        rows = self.db.execute("SELECT name, registered_at, last_slot FROM schedules")
        return {r[0]: {"registered_at": r[1], "last_slot": r[2]} for r in rows}

    def last_slot(self, name: str) -> float | None:
        row = self.db.execute("SELECT last_slot FROM schedules WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_last_slot(self, name: str, slot: float) -> None:
        self.slot_pending = True  # committed before the fired task may run (see the supervisor's turn)
        self.db.execute("UPDATE schedules SET last_slot=max(coalesce(last_slot, 0), ?) WHERE name=?", (slot, name))

    # ---- session key-values ------------------------------------------------------------------
    def kv_get(self, session_id: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).fetchone()
        return row[0] if row else None

    def kv_set(self, session_id: str, key: str, text: str) -> None:
        self.db.execute(
            "INSERT INTO session_kv(session_id, key, value, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT(session_id, key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (session_id, key, text, time.time()),
        )

    def kv_delete(self, session_id: str, key: str) -> bool:
        return self.db.execute("DELETE FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).rowcount > 0

    def kv_items(self, session_id: str) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT key, value FROM session_kv WHERE session_id=? ORDER BY key", (session_id,))
        return [(k, v) for k, v in rows]


def _events_after(
    db: sqlite3.Connection, after: int, limit: int, task_id: str | None, session_id: str | None
) -> list[dict[str, Any]]:
    args: tuple[object, ...] = (after,)
    where = "seq>?"
    if task_id is not None:
        where, args = "task_id=? AND seq>?", (task_id, after)
    elif session_id is not None:
        where, args = "session_id=? AND seq>?", (session_id, after)
    rows = db.execute(
        f"SELECT seq, task_id, session_id, kind, data, ts FROM events WHERE {where} ORDER BY seq LIMIT ?",
        (*args, limit),
    )
    return [
        {"seq": r[0], "task_id": r[1], "session_id": r[2], "kind": r[3], "data": json.loads(r[4]), "ts": r[5]}
        for r in rows
    ]


# ---- reading from other processes ------------------------------------------------------------

_ORDER = {
    QUEUED: "created_at ASC, id ASC",  # next to run first
    SCHEDULED: "coalesce(run_at, created_at) ASC, id ASC",  # next due first
    RUNNING: "started_at DESC, id DESC",
    SUCCEEDED: "finished_at DESC, id DESC",  # most recent first
    FAILED: "finished_at DESC, id DESC",
    CANCELLED: "finished_at DESC, id DESC",
}
_CARD_ROW = (
    "id, name, state, attempts, lock_key, session_id, created_at, started_at, finished_at, run_at, "
    "progress, error_type, error_message, slot"
)
MAX_PAGE = 200


def _filters(name: str | None, session: str | None, lock: str | None) -> tuple[str, list[Any]]:
    """Substring filters (case-sensitive) on name, session id and lock key."""
    where, params = [], []
    for column, value in (("name", name), ("session_id", session), ("lock_key", lock)):
        if value:
            where.append(f"instr({column}, ?) > 0")
            params.append(value)
    return (" AND ".join(where) or "1"), params


def _card_row(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    etype, emsg = d.pop("error_type"), d.pop("error_message")
    d["error"] = f"{etype}: {emsg or ''}" if etype else None
    return d


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class SQLiteReader(StoreReader):
    """Read-only connections to ``capsule.db`` (``mode=ro``, ``query_only``), one per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode=ro",
                uri=True,
                check_same_thread=False,
                timeout=10.0,
                isolation_level=None,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        db = self._db()
        if db.in_transaction:  # nested: the outer snapshot holds
            yield
            return
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def last_seq(self) -> int:
        row = self._db().execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def board(
        self,
        *,
        name: str | None = None,
        session: str | None = None,
        lock: str | None = None,
        offsets: dict[str, int] | None = None,
        page_size: int = 50,
        names: bool = False,
    ) -> dict[str, Any]:
        where, params = _filters(name, session, lock)
        offsets = offsets or {}
        page_size = max(1, min(MAX_PAGE, page_size))
        with self.snapshot():  # one snapshot for counts and pages
            db = self._db()
            counts = dict(
                db.execute(f"SELECT state, count(*) FROM tasks WHERE {where} GROUP BY state", params).fetchall()
            )
            columns = []
            for state in TaskState:
                count = int(counts.get(state.value, 0))
                offset = max(0, min(int(offsets.get(state.value, 0)), max(0, count - 1)))
                offset -= offset % page_size
                rows = db.execute(
                    f"SELECT {_CARD_ROW} FROM tasks WHERE state=? AND {where} "
                    f"ORDER BY {_ORDER[state]} LIMIT ? OFFSET ?",
                    [state.value, *params, page_size, offset],
                ).fetchall()
                columns.append(
                    {"state": state.value, "count": count, "offset": offset, "tasks": [_card_row(r) for r in rows]}
                )
            out: dict[str, Any] = {
                "columns": columns,
                "seq": self.last_seq(),
                "page_size": page_size,
                "total": sum(int(v) for v in counts.values()),
            }
            if names:
                out["names"] = [r[0] for r in db.execute("SELECT DISTINCT name FROM tasks ORDER BY name LIMIT 500")]
        return out

    def task_detail(self, task_id: str, max_events: int = 200) -> dict[str, Any] | None:
        with self.snapshot():
            db = self._db()
            row = db.execute(
                f"SELECT {_CARD_ROW}, session_owner, traceback, length(args) AS args_bytes, "
                "length(result) AS result_bytes FROM tasks WHERE id=?",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            out = _card_row(row)
            events = db.execute(
                "SELECT seq, kind, data, ts, session_id FROM events WHERE task_id=? ORDER BY seq DESC LIMIT ?",
                (task_id, max_events),
            ).fetchall()
            n_events = int(db.execute("SELECT count(*) FROM events WHERE task_id=?", (task_id,)).fetchone()[0])
        out["events"] = [
            {"seq": e[0], "kind": e[1], "data": _json(e[2]), "ts": e[3], "session_id": e[4]} for e in reversed(events)
        ]
        out["events_total"] = n_events
        return out

    def due_scheduled(self, now: float, limit: int) -> list[str]:
        rows = self._db().execute(
            # the literal state lets SQLite use the partial index tasks_scheduled
            "SELECT id FROM tasks WHERE state='SCHEDULED' AND run_at <= ? ORDER BY run_at LIMIT ?",
            (now, limit),
        )
        return [r[0] for r in rows]

    def next_scheduled_after(self, now: float) -> float | None:
        row = (
            self._db()
            .execute("SELECT min(run_at) FROM tasks WHERE state='SCHEDULED' AND run_at > ?", (now,))
            .fetchone()
        )
        return float(row[0]) if row and row[0] is not None else None


__all__ = ["DB_FILE", "MAX_PAGE", "SCHEMA_VERSION", "SQLiteReader", "SQLiteStore"]
