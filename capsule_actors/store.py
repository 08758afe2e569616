"""The durable task store: one SQLite file (WAL) in the state directory, written by the supervisor.

The supervisor is the only writer. Its loop opens one transaction per turn and commits it before
sending any reply, so every acknowledgement follows a commit and concurrent submits share one
commit (group commit). ``synchronous=NORMAL`` in WAL mode: a process crash (supervisor, actor,
client) loses nothing committed; a power loss or kernel crash can lose the last commits.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import StateDirError

SCHEMA_VERSION = 1
# Every index costs page writes on the hot path (each submit, dispatch and result): keep few.
# Submit order is the rowid (newest first = ORDER BY rowid DESC), so created_at needs none.
LIVE_STATES = ("QUEUED", "SCHEDULED", "RUNNING")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")

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

INFO_COLUMNS = (
    "id, name, state, attempts, lock_key, session_id, created_at, started_at, finished_at, "
    "error_type, error_message, progress, slot"
)


class Store:
    """Typed access to capsule.db for the supervisor thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if sqlite3.sqlite_version_info < (3, 35):
            raise StateDirError(
                f"SQLite {sqlite3.sqlite_version} is too old: capsule_actors needs 3.35 or newer "
                "(UPDATE ... RETURNING); use a Python built against a newer libsqlite3"
            )
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")  # session.db writers hold the lock briefly
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # the supervisor checkpoints after replying
            self.db.executescript(_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.Error as exc:
            raise StateDirError(f"cannot open task store {str(path)!r}: {exc}") from None
        self.db.row_factory = sqlite3.Row
        self._in_tx = False
        self.slot_pending = False  # a schedule's fired slot was written since the last commit
        self._committed_changes = 0
        self.commits = 0
        self._touched: set[str] = set()
        self._touched_sessions: set[str] = set()
        self._any_event = False
        self._cards: dict[str, set[str]] = {}  # task id -> sessions showing its card
        for task_id, session_id in self.db.execute(
            "SELECT c.task_id, c.session_id FROM cards c JOIN tasks t ON t.id = c.task_id "
            "WHERE t.state IN ('QUEUED','SCHEDULED','RUNNING')"
        ):
            self._cards.setdefault(task_id, set()).add(session_id)

    def close(self) -> None:
        self.db.close()

    # ---- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        if not self._in_tx:
            # IMMEDIATE: take the write lock now (waiting out a session.db writer); a deferred
            # transaction that read first could not upgrade once another writer had committed
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
        """Rows were written since the last commit."""
        return self.db.total_changes != self._committed_changes

    def checkpoint_if_needed(self, every: int = 1000) -> None:
        """Copy the WAL back into the database every ``every`` commits (PASSIVE: never waits
        for readers). Called by the supervisor after it has sent its replies, so no
        acknowledgement waits for a checkpoint (SQLite's own auto-checkpoint runs inside COMMIT)."""
        if self.commits >= every:
            self.commits = 0
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ---- writes ------------------------------------------------------------------------------
    def insert_tasks(self, rows: Iterable[tuple[Any, ...]]) -> list[tuple[str, int]]:
        """Insert (id, name, state, lock_key, session_id, session_owner, args, created_at, run_at)
        rows; return (id, rowid) of those that were new (a resent submit is ignored)."""
        new = []
        for row in rows:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO tasks(id, name, state, lock_key, session_id, session_owner, "
                "args, created_at, run_at) VALUES (?,?,?,?,?,?,?,?,?)",
                row,
            )
            if cur.rowcount:
                new.append((row[0], int(cur.lastrowid or 0)))
                self.add_event(row[0], row[4], "state", {"state": row[2], "attempt": 0, "name": row[1]})
        return new

    def args(self, task_id: str) -> bytes:
        """A task's pickled arguments: a process actor's Run leaves before its attempt starts."""
        row = self.db.execute("SELECT args FROM tasks WHERE id=?", (task_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def mark_running(self, task_id: str, session_id: str | None, attempt: int, slot: str, now: float) -> bytes:
        """Record the attempt's start; return the task's pickled arguments (one statement)."""
        row = self.db.execute(
            "UPDATE tasks SET state='RUNNING', attempts=?, slot=?, started_at=? WHERE id=? RETURNING args",
            (attempt, slot, now, task_id),
        ).fetchone()
        self.add_event(task_id, session_id, "state", {"state": "RUNNING", "attempt": attempt, "slot": slot})
        return bytes(row[0]) if row and row[0] is not None else b""

    def finish(
        self,
        task_id: str,
        session_id: str | None,
        state: str,
        result: bytes | None,
        error: tuple[str, str, str] | None,
        now: float,
    ) -> None:
        """Record a terminal state with its result or (type, message, traceback) error."""
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
        error: tuple[str, str, str] | None,
        attempts: int | None = None,
    ) -> None:
        """Put a task back in the queue (a retry, or a re-run after a shutdown or crash)."""
        state = "QUEUED"
        if attempts is not None:
            self.db.execute("UPDATE tasks SET attempts=? WHERE id=?", (attempts, task_id))
        if error:
            self.db.execute(
                "UPDATE tasks SET state=?, run_at=?, error_type=?, error_message=?, traceback=? WHERE id=?",
                (state, run_at, *error, task_id),
            )
        else:
            self.db.execute("UPDATE tasks SET state=?, run_at=? WHERE id=?", (state, run_at, task_id))
        data: dict[str, Any] = {"state": state, "retry_at": run_at}
        if error:
            data["error"] = f"{error[0]}: {error[1]}"
        self.add_event(task_id, session_id, "state", data)

    def add_event(self, task_id: str, session_id: str | None, kind: str, data: dict[str, Any]) -> int:
        cur = self.db.execute(
            "INSERT INTO events(task_id, session_id, kind, data, ts) VALUES (?,?,?,?,?)",
            (task_id, session_id, kind, json.dumps(data), time.time()),
        )
        self._touched.add(task_id)
        self._any_event = True
        if session_id is not None:
            self._touched_sessions.add(session_id)
        if kind in ("state", "progress") and task_id in self._cards:
            self._update_cards(task_id, data)
        return int(cur.lastrowid or 0)

    def show_card(self, task_id: str, session_id: str) -> dict[str, Any] | None:
        """``session.show_task(h)``: the session follows the task's card from now on; returns the
        card's first content (None for an unknown task)."""
        card = self._card(task_id)
        if card is None:
            return None
        self.db.execute("INSERT OR IGNORE INTO cards(task_id, session_id) VALUES (?,?)", (task_id, session_id))
        if card["state"] in LIVE_STATES:
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

    def _update_cards(self, task_id: str, state_data: dict[str, Any]) -> None:
        """A followed task changed state: every session showing its card gets an update event."""
        card = self._card(task_id)
        if card is None:
            return
        card["update"] = True
        sessions = self._cards[task_id]
        if card["state"] not in LIVE_STATES:
            del self._cards[task_id]
        for session_id in sorted(sessions):
            self.add_event(task_id, session_id, "card", card)

    def take_touched(self) -> tuple[set[str], set[str], bool]:
        """Task ids and session ids that got events since the last call, and whether any event
        was added at all (to wake long polls)."""
        touched, self._touched = self._touched, set()
        sessions, self._touched_sessions = self._touched_sessions, set()
        any_event, self._any_event = self._any_event, False
        return touched, sessions, any_event

    def set_progress(self, task_id: str, fraction: float) -> None:
        self.db.execute("UPDATE tasks SET progress=? WHERE id=?", (fraction, task_id))

    def prune_events(self, before: float, keep_max: int) -> int:
        """Retention: drop events older than ``before`` (epoch s), then all but the newest
        ``keep_max``. Tasks keep their final record; only the event log is trimmed."""
        # events are appended in time order: the first young one bounds the old ones (no ts index)
        first = self.db.execute("SELECT seq FROM events WHERE ts >= ? ORDER BY seq LIMIT 1", (before,)).fetchone()
        if first is None:
            first = self.db.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()
        n = self.db.execute("DELETE FROM events WHERE seq < ?", (first[0],)).rowcount
        row = self.db.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep_max,)).fetchone()
        if row is not None:
            n += self.db.execute("DELETE FROM events WHERE seq <= ?", (row[0],)).rowcount
        return n

    # ---- reads -------------------------------------------------------------------------------
    def info(self, task_id: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {INFO_COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
        return dict(row) if row else None

    def outcome(self, task_id: str) -> tuple[str, bytes | None, list[str | None]] | None:
        """(state, result bytes, [error_type, error_message, traceback]) of one task."""
        row = self.db.execute(
            "SELECT state, result, error_type, error_message, traceback FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        if row is None:
            return None
        return row[0], row[1], [row[2], row[3], row[4]]

    def list_tasks(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        if state:
            rows = self.db.execute(
                f"SELECT {INFO_COLUMNS} FROM tasks WHERE state=? ORDER BY rowid DESC LIMIT ?",
                (state, limit),
            )
        else:
            rows = self.db.execute(f"SELECT {INFO_COLUMNS} FROM tasks ORDER BY rowid DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def live_tasks(self) -> Iterator[sqlite3.Row]:
        """Every queued, scheduled or running task in submit order (for recovery at start)."""
        return iter(
            self.db.execute(
                "SELECT rowid, id, name, state, lock_key, session_id, session_owner, attempts, run_at, slot "
                "FROM tasks WHERE state IN ('QUEUED','SCHEDULED','RUNNING') ORDER BY rowid"
            ).fetchall()
        )

    def backlog_rows(self, after: int, limit: int) -> list[sqlite3.Row]:
        """Unlocked QUEUED tasks past rowid ``after``, in submit order: the backlog the supervisor
        pages in as its in-memory queue drains."""
        return self.db.execute(
            "SELECT rowid, id, name, attempts, session_id, session_owner, run_at FROM tasks "
            "WHERE rowid > ? AND state='QUEUED' AND lock_key IS NULL ORDER BY rowid LIMIT ?",
            (after, limit),
        ).fetchall()

    def live_locked(self) -> list[tuple[str, str, str]]:
        """(id, name, lock_key) of every live locked task, in submit order (rowid)."""
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT id, name, lock_key FROM tasks WHERE state IN ('QUEUED','SCHEDULED','RUNNING') "
                "AND lock_key IS NOT NULL ORDER BY rowid"
            )
        ]

    def live_row(self, task_id: str) -> dict[str, Any] | None:
        """The record of a queued, scheduled or running task (None when finished or unknown)."""
        row = self.db.execute(
            "SELECT id, name, state, attempts, lock_key, session_id, session_owner, run_at FROM tasks "
            "WHERE id=? AND state IN ('QUEUED','SCHEDULED','RUNNING')",
            (task_id,),
        ).fetchone()
        return dict(row) if row else None

    def count_state(self, state: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM tasks WHERE state=?", (state,)).fetchone()[0])

    def exists(self, task_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM tasks WHERE id=?", (task_id,)).fetchone() is not None

    def events_after(
        self, after: int, limit: int = 500, *, task_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Events with seq > ``after`` in order: of one task, of one session, or all of them."""
        args: tuple[object, ...] = (after,)
        where = "seq>?"
        if task_id is not None:
            where, args = "task_id=? AND seq>?", (task_id, after)
        elif session_id is not None:
            where, args = "session_id=? AND seq>?", (session_id, after)
        rows = self.db.execute(
            f"SELECT seq, task_id, session_id, kind, data, ts FROM events WHERE {where} ORDER BY seq LIMIT ?",
            (*args, limit),
        )
        return [
            {"seq": r[0], "task_id": r[1], "session_id": r[2], "kind": r[3], "data": json.loads(r[4]), "ts": r[5]}
            for r in rows
        ]

    def prune_finished(self, before: float, batch: int = 10_000) -> int:
        """Delete finished tasks (with their events and card links) that ended before ``before``."""
        ids = [
            r[0]
            for r in self.db.execute(
                "SELECT id FROM tasks WHERE state IN ('SUCCEEDED','FAILED','CANCELLED') AND finished_at < ? LIMIT ?",
                (before, batch),
            )
        ]
        for task_id in ids:
            self.db.execute("DELETE FROM events WHERE task_id=?", (task_id,))
            self.db.execute("DELETE FROM cards WHERE task_id=?", (task_id,))
            self.db.execute("DELETE FROM tasks WHERE id=?", (task_id,))
        return len(ids)

    def register_schedules(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        """Know every declared schedule; a changed cron or time zone starts it afresh."""
        for name, cron, tz in specs:
            self.db.execute(
                "INSERT INTO schedules(name, cron, tz, registered_at) VALUES (?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET cron=excluded.cron, tz=excluded.tz, "
                "registered_at=excluded.registered_at, last_slot=NULL "
                "WHERE schedules.cron != excluded.cron OR schedules.tz != excluded.tz",
                (name, cron, tz, now),
            )

    def schedule_marks(self) -> dict[str, dict[str, float | None]]:
        """name -> {registered_at, last_slot}: where the clock resumes each schedule."""
        rows = self.db.execute("SELECT name, registered_at, last_slot FROM schedules")
        return {r[0]: {"registered_at": r[1], "last_slot": r[2]} for r in rows}

    def last_slot(self, name: str) -> float | None:
        row = self.db.execute("SELECT last_slot FROM schedules WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_last_slot(self, name: str, slot: float) -> None:
        self.slot_pending = True  # committed before the fired task may run (see Supervisor._turn)
        self.db.execute("UPDATE schedules SET last_slot=max(coalesce(last_slot, 0), ?) WHERE name=?", (slot, name))

    def retry_row(self, task_id: str) -> tuple[Any, ...] | None:
        """(name, state, lock_key, session_id, session_owner, args) of a task, to submit it again."""
        row = self.db.execute(
            "SELECT name, state, lock_key, session_id, session_owner, args FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        return tuple(row) if row else None

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT state, count(*) FROM tasks GROUP BY state")}
