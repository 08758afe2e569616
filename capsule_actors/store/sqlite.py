"""The embedded store: one SQLite file (WAL) in the state directory, written by the supervisor only.

The supervisor's loop opens one transaction per turn and commits it before sending any reply, so
every acknowledgement follows a commit and concurrent submits share one commit (group commit).
``synchronous=NORMAL`` in WAL mode: a process crash (supervisor, actor, client) loses nothing
committed; a power loss or kernel crash can lose the last commits. Other processes (the board,
the clock actor) read through ``SQLiteReader``: read-only connections that WAL lets run beside
the writer. ``session.db`` reaches this file through the supervisor too, so it has one writer.

A bounded WAL (``maintain()``): once it passes ``WAL_CHECKPOINT``, a checkpointer thread copies
it into the database (the slow part: tens of milliseconds for 16 MiB here), then the loop copies
the few frames added meanwhile, so the next commit starts the WAL over and ``journal_size_limit``
cuts the file back to ``WAL_CHECKPOINT``.

A full disk (``commit()``): dirty pages never spill before COMMIT (``cache_spill=OFF``), so
SQLite fails only at COMMIT, and then rolls the whole transaction back. The store keeps every
write of the open transaction (``_redo``) until it commits, redoes them into a new transaction
and tries again after releasing ``RESERVE`` (a file of its own kept for this); if that fails too
it raises ``StoreFull`` with the writes in the open transaction. ``space()`` says the store is
full while the reserve is spent or the file system has less than ``RESERVE`` free, and
``maintain()`` makes the reserve again once there is twice that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import StateDirError, StoreFull
from ..states import CANCELLED, FAILED, LIVE, QUEUED, RUNNING, SCHEDULED, SUCCEEDED, TaskState
from .base import (
    ACTOR_EXIT,
    CRASHED_PATTERN,
    FLOW_EVENT,
    FLOW_RECORD,
    Error,
    KeptArgs,
    NewTask,
    StatsRows,
    StoredTask,
    StoreReader,
    StoreSpace,
    TaskStore,
    board_flows,
    check_schema,
    flow_members,
    quoted,
)

log = logging.getLogger("capsule_actors.store")

DB_FILE = "capsule.db"
SCHEMA_VERSION = 3
WAL_CHECKPOINT = 16 << 20  # bytes: a WAL past this is checkpointed; journal_size_limit cuts it back to this
RESERVE = 8 << 20  # bytes the store keeps in RESERVE_SUFFIX for the writes that finish what it holds
RESERVE_SUFFIX = "-reserve"
STAT_EVERY = 0.01  # seconds between looks at the WAL's size
SPACE_EVERY = 1.0  # seconds between looks at the file system's free space
RETRY_EVERY = 0.5  # least seconds between COMMITs tried while the disk is full (the loop asks each 1 s)
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
-- retention finds expired results without a scan (appended at its end as tasks finish)
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at) WHERE finished_at IS NOT NULL;
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
# Version n's changes from n - 1; a new store is made as version 1, then brought up to date.
_MIGRATIONS = {
    2: """
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN rate_key TEXT;
-- a FAILED task resubmitted by `capsule-actors retry`: the new task's id
ALTER TABLE tasks ADD COLUMN retried_as TEXT;
-- the backlog of a priority other than 0, in submit order (an index entry ends with its rowid);
-- tasks of priority 0 never enter it
CREATE INDEX IF NOT EXISTS tasks_prioritized ON tasks(priority) WHERE state='QUEUED' AND priority != 0;
""",
    3: """
-- a workflow step's workflow (its flow record's id), written with the record's `flow` event: the
-- board shows a workflow as one card (an index of step rows only: other tasks never enter it)
ALTER TABLE tasks ADD COLUMN flow_id TEXT;
CREATE INDEX IF NOT EXISTS tasks_flow ON tasks(flow_id) WHERE flow_id IS NOT NULL;
-- the workflows recorded before: their steps, from their `flow` events
UPDATE tasks SET flow_id = f.flow FROM (
    SELECT e.task_id AS flow, s.value AS step
    FROM events e, json_each(CASE WHEN json_valid(e.data) THEN e.data ELSE '{}' END, '$.steps') s
    WHERE e.kind = 'flow'
    UNION ALL
    SELECT task_id, json_extract(data, '$.on_error') FROM events
    WHERE kind = 'flow' AND json_valid(data) AND json_type(data, '$.on_error') = 'text'
) AS f WHERE tasks.id = f.step;
""",
}

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
_STORED = "rowid, id, name, state, lock_key, session_id, session_owner, attempts, run_at, slot, priority, rate_key"


def _stored(row: tuple[Any, ...]) -> StoredTask:
    return StoredTask(row[0], row[1], row[2], TaskState(row[3]), *row[4:])


def _info(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(INFO_FIELDS, row))


def _damaged(path: Path, what: str) -> StateDirError:
    return StateDirError(
        f"task store {str(path)!r} is damaged ({what}); the supervisor will not serve it. Stop "
        f"here and restore {path.name} from a backup, or keep what SQLite can still read: "
        f"`sqlite3 {path} .recover > recovered.sql`, move {path.name} and its -wal aside, then "
        f"`sqlite3 {path} < recovered.sql`"
    )


def _no_room(exc: sqlite3.OperationalError) -> bool:
    """SQLite could not write for lack of space (the -shm file grows by writing, too)."""
    return exc.sqlite_errorcode in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_version() -> None:
    if sqlite3.sqlite_version_info < (3, 35):
        raise StateDirError(
            f"SQLite {sqlite3.sqlite_version} is too old: capsule_actors needs 3.35 or newer "
            "(UPDATE ... RETURNING); use a Python built against a newer libsqlite3"
        )


_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=30000",  # a reader's checkpoint can hold the file briefly
    "PRAGMA wal_autocheckpoint=0",  # maintain() checkpoints, after the replies (not inside COMMIT)
    f"PRAGMA journal_size_limit={WAL_CHECKPOINT}",  # each time the WAL starts over it is cut back to this
    "PRAGMA cache_spill=OFF",  # no page is written before COMMIT: a full disk fails there only
    "PRAGMA temp_store=MEMORY",  # nor any temporary file
)


class _Checkpointer:
    """A thread with its own connection that copies the WAL into the database (page writes and a
    sync: tens of milliseconds for 16 MiB), so the loop only finishes what was added meanwhile."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._wanted = threading.Event()
        self.done = threading.Event()
        self.busy = False  # asked and not yet seen done (the loop's flag)
        self.complete = False  # the last run copied every frame (no reader held one back)
        self.error: str | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="capsule-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self.busy = True
        self.done.clear()
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:  # PASSIVE: copies what no reader still needs, waits for nobody
                blocked, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.complete, self.error = not blocked and frames == copied, None
            except sqlite3.Error as exc:  # e.g. no room for the database to grow: the WAL waits
                self.complete, self.error = False, str(exc)
            self.done.set()

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join(30)
        self._db.close()


class SQLiteStore(TaskStore):
    """``capsule.db`` for the supervisor's loop thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wal = path.with_name(path.name + "-wal")
        self._reserve = path.with_name(path.name + RESERVE_SUFFIX)
        self._reserved = _size(self._reserve) >= RESERVE
        self._free = -1  # unknown until maintain() looks
        _check_version()
        try:
            try:
                found, cards = self._open()
            except sqlite3.OperationalError as exc:  # no room even for the -shm file: use the reserve
                if not (_no_room(exc) and self._release_reserve()):
                    raise
                found, cards = self._open()
        except sqlite3.OperationalError as exc:
            free = f" ({_mib(_free(path.parent))} free on its file system)" if _no_room(exc) else ""
            raise StateDirError(f"cannot open task store {str(path)!r}: {exc}{free}") from None
        except sqlite3.DatabaseError as exc:  # not a database, or a malformed one
            raise _damaged(path, str(exc)) from None
        if found > SCHEMA_VERSION:
            self.db.close()
            raise StateDirError(
                f"task store {str(path)!r} has schema version {found}, newer than this capsule_actors "
                f"knows ({SCHEMA_VERSION}): run the version that wrote it"
            )
        self._in_tx = False
        self.slot_pending = False
        self._committed_changes = 0
        self._redo: list[tuple[str, tuple[Any, ...]]] = []  # the open transaction's writes, in order
        self._held = False  # a COMMIT found no room: the open transaction holds writes to commit
        self._retry_at = 0.0
        self._touched: set[str] = set()
        self._touched_sessions: set[str] = set()
        self._any_event = False
        self._cards: dict[str, set[str]] = {}  # task id -> sessions showing its card
        for task_id, session_id in cards:
            self._cards.setdefault(task_id, set()).add(session_id)
        self._checkpointer: _Checkpointer | None = None
        self._store_bytes = self._wal_bytes = 0
        self._next_stat = self._next_space = 0.0
        self._args = KeptArgs()

    def _open(self) -> tuple[int, list[tuple[str, str]]]:
        """Connect, set up, and read what the store keeps in memory: (schema version, cards)."""
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:
            self.db.execute(pragma)
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1')")
        found = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        for version in range(found + 1, SCHEMA_VERSION + 1):  # each step in a transaction of its own
            self.db.executescript(
                f"BEGIN IMMEDIATE; {_MIGRATIONS[version]} "
                f"UPDATE meta SET value='{version}' WHERE key='schema_version'; COMMIT;"
            )
            found = version
        cards = self.db.execute(
            f"SELECT c.task_id, c.session_id FROM cards c JOIN tasks t ON t.id = c.task_id WHERE t.state IN {_LIVE_SQL}"
        ).fetchall()
        return found, cards

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close()

    # ---- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        if not self._in_tx:
            # IMMEDIATE: take the write lock now, so no later statement of the turn can find it taken
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def commit(self) -> None:
        """COMMIT; with no room, release the reserve and COMMIT again; with none still, keep the
        writes in the open transaction and raise ``StoreFull`` (tried again RETRY_EVERY later)."""
        if not self._in_tx:
            self._redo.clear()
            return
        if self._held and time.monotonic() < self._retry_at:
            self._no_room()
        if not (self._try_commit() or (self._release_reserve() and self._try_commit())):
            self._held = True
            self._retry_at = time.monotonic() + RETRY_EVERY
            self._no_room()
        if self._held:
            self._held = False
            log.warning("the task store could commit again: every write held meanwhile is saved")
        self._redo.clear()
        self._in_tx = False
        self.slot_pending = False
        self._committed_changes = self.db.total_changes

    def _try_commit(self) -> bool:
        """COMMIT, True when it did; when it found no room, SQLite rolled the transaction back:
        open it again with the same writes, so this store still holds what its caller believes."""
        try:
            self.db.execute("COMMIT")
            return True
        except sqlite3.OperationalError as exc:
            if not _no_room(exc):
                raise
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.execute("BEGIN IMMEDIATE")
        for sql, params in self._redo:
            self.db.execute(sql, params).fetchall()
        return False

    def _no_room(self) -> None:
        """Raise StoreFull; the writes so far count as tried (``dirty()`` says what came after)."""
        self._committed_changes = self.db.total_changes
        space = self.space()
        raise StoreFull(
            f"no room to write the task store {space.path!r}: {_mib(space.free_bytes)} free on its file "
            "system; the writes wait in memory and are committed once there is room"
        )

    def _release_reserve(self) -> bool:
        """Give the reserve's room to the writes that found none (False when it is spent already)."""
        if not self._reserved:
            return False
        self._reserve.unlink(missing_ok=True)
        self._reserved = False
        self._free = _free(self.path.parent)
        log.warning(
            "the file system of %s is full: the store released its %s reserve to finish the tasks it "
            "holds; new tasks are refused until %s are free",
            self.path,
            _mib(RESERVE),
            _mib(2 * RESERVE),
        )
        return True

    def dirty(self) -> bool:
        return self.db.total_changes != self._committed_changes

    # ---- housekeeping ------------------------------------------------------------------------
    def maintain(self) -> None:
        """Look at the WAL's size (each STAT_EVERY) and the free space (each SPACE_EVERY)."""
        now = time.monotonic()
        if now >= self._next_stat:
            self._next_stat = now + STAT_EVERY
            self._store_bytes, self._wal_bytes = _size(self.path), _size(self._wal)
        if not self._in_tx:  # open: a commit found no room, and a checkpoint cannot run inside it
            self._checkpoint()
        if now >= self._next_space:
            self._next_space = now + SPACE_EVERY
            self._look_at_space()

    def _checkpoint(self) -> None:
        """A WAL past WAL_CHECKPOINT is copied into the database by the checkpointer thread; once
        it copied every frame, the loop copies the few added since (a complete checkpoint when
        the next write begins is what lets the WAL start over, and be cut back)."""
        ck = self._checkpointer
        if ck is not None and ck.busy:
            if ck.done.is_set():
                ck.busy = False
                if ck.complete:
                    self._loop_checkpoint()
                elif ck.error:
                    log.debug("WAL checkpoint of %s: %s", self.path, ck.error)
        elif self._wal_bytes > WAL_CHECKPOINT:
            self._checkpointer = ck or _Checkpointer(self.path)
            self._checkpointer.request()

    def _loop_checkpoint(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.OperationalError as exc:  # no room for the database to grow: the WAL waits
            log.debug("WAL checkpoint of %s: %s", self.path, exc)

    def _look_at_space(self) -> None:
        known, was_full = self._free >= 0, self.space().full
        self._reserved = self._reserved and self._reserve.exists()  # an operator may delete it
        self._free = _free(self.path.parent)
        if not self._reserved and not self._held and self._free >= 2 * RESERVE:
            self._make_reserve()
        full = self.space().full
        if known and full != was_full:
            log.warning(
                "task store %s: %s free on its file system: new tasks are %s",
                self.path,
                _mib(self._free),
                f"refused until {_mib(2 * RESERVE)} are free" if full else "taken again",
            )

    def _make_reserve(self) -> None:
        """Hold RESERVE bytes of the file system in a file of our own, for the day it fills up."""
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE)
            finally:
                os.close(fd)
        except OSError as exc:
            self._reserve.unlink(missing_ok=True)
            log.warning("cannot keep a reserve of %s in %s: %s", _mib(RESERVE), self._reserve, exc.strerror)
            return
        self._reserved = True
        self._free = _free(self.path.parent)

    def space(self) -> StoreSpace:
        full = not self._reserved or self._free < RESERVE
        return StoreSpace(str(self.path), self._store_bytes, self._wal_bytes, self._free, full)

    def check(self) -> None:
        """``PRAGMA quick_check``: every page's structure, the indexes' order (not their content)."""
        try:
            problems = [str(row[0]) for row in self.db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems != ["ok"]:
            raise _damaged(self.path, "; ".join(problems))

    def _w(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """A write of the open transaction, kept until it commits (``commit()`` may redo it)."""
        self._redo.append((sql, params))
        return self.db.execute(sql, params)

    # ---- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, rows: Iterable[NewTask], pooled: Collection[str] = ()) -> list[tuple[str, int]]:
        new = []
        for row in rows:
            cur = self._w(
                "INSERT OR IGNORE INTO tasks(id, name, state, lock_key, session_id, session_owner, "
                "args, created_at, run_at, priority, rate_key) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            if cur.rowcount:
                new.append((row.id, int(cur.lastrowid or 0)))
                self._args.keep(row.id, row.args)
                data = f'{{"state": {quoted(row.state)}, "attempt": 0, "name": {quoted(row.name)}}}'
                self._add_event(row.id, row.session_id, "state", data)
        return new

    def args(self, task_id: str) -> bytes:
        kept = self._args.take(task_id)
        if kept is not None:
            return kept
        row = self.db.execute("SELECT args FROM tasks WHERE id=?", (task_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def set_args(self, task_id: str, args: bytes) -> None:
        self._w("UPDATE tasks SET args=? WHERE id=?", (args, task_id))
        self._args.keep(task_id, args)

    def lock_step(self, task_id: str, key: str, args: bytes) -> None:
        self._w(
            "UPDATE tasks SET rowid=(SELECT max(rowid) + 1 FROM tasks), lock_key=?, args=? WHERE id=?",
            (key, args, task_id),
        )
        self._args.keep(task_id, args)

    def results(self, task_ids: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for i in range(0, len(task_ids), 500):  # under SQLite's bound-parameter limit
            part = task_ids[i : i + 500]
            marks = ",".join("?" * len(part))
            for task_id, result in self.db.execute(f"SELECT id, result FROM tasks WHERE id IN ({marks})", part):
                out[task_id] = bytes(result or b"")
        return out

    def flow_waiting(self) -> list[tuple[str, str | None, bytes]]:
        rows = self.db.execute(
            "SELECT id, session_id, args FROM tasks WHERE state='SCHEDULED' AND run_at IS NULL ORDER BY rowid"
        ).fetchall()
        return [(task_id, sid, bytes(args or b"")) for task_id, sid, args in rows]

    def mark_running(self, task_id: str, session_id: str | None, attempt: int, slot: str, now: float) -> None:
        self._w(
            "UPDATE tasks SET state='RUNNING', attempts=?, slot=?, started_at=? WHERE id=?",
            (attempt, slot, now, task_id),
        )
        data = f'{{"state": "RUNNING", "attempt": {int(attempt)}, "slot": {quoted(slot)}}}'
        self._add_event(task_id, session_id, "state", data)

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
        self._w(
            "UPDATE tasks SET state=?, result=?, error_type=?, error_message=?, traceback=?, "
            "finished_at=?, run_at=NULL WHERE id=?",
            (state, result, etype, emsg, tb, now, task_id),
        )
        if etype:
            self.add_event(task_id, session_id, "state", {"state": state, "error": f"{etype}: {emsg}"})
        else:
            self._add_event(task_id, session_id, "state", f'{{"state": {quoted(state)}}}')

    def requeue(
        self,
        task_id: str,
        session_id: str | None,
        run_at: float | None,
        error: Error | None,
        attempts: int | None = None,
    ) -> None:
        if attempts is not None:
            self._w("UPDATE tasks SET attempts=? WHERE id=?", (attempts, task_id))
        if error:
            self._w(
                "UPDATE tasks SET state='QUEUED', run_at=?, error_type=?, error_message=?, traceback=? WHERE id=?",
                (run_at, *error, task_id),
            )
        else:
            self._w("UPDATE tasks SET state='QUEUED', run_at=? WHERE id=?", (run_at, task_id))
        data: dict[str, Any] = {"state": QUEUED, "retry_at": run_at}
        if error:
            data["error"] = f"{error[0]}: {error[1]}"
        self.add_event(task_id, session_id, "state", data)

    def set_progress(self, task_id: str, fraction: float) -> None:
        self._w("UPDATE tasks SET progress=? WHERE id=?", (fraction, task_id))

    def add_event(self, task_id: str, session_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self._add_event(task_id, session_id, kind, json.dumps(data))
        if kind == FLOW_EVENT:  # a workflow's steps (recorded in this transaction): they are its own
            steps = flow_members(data)
            for i in range(0, len(steps), 500):  # under SQLite's bound-parameter limit
                part = steps[i : i + 500]
                self._w(f"UPDATE tasks SET flow_id=? WHERE id IN ({','.join('?' * len(part))})", (task_id, *part))

    def _add_event(self, task_id: str, session_id: str | None, kind: str, data: str) -> None:
        """An event whose data is JSON text already (the state events of every task: see quoted)."""
        self._w(
            "INSERT INTO events(task_id, session_id, kind, data, ts) VALUES (?,?,?,?,?)",
            (task_id, session_id, kind, data, time.time()),
        )
        self._touched.add(task_id)
        self._any_event = True
        if session_id is not None:
            self._touched_sessions.add(session_id)
        if task_id in self._cards and kind in ("state", "progress"):
            self._update_cards(task_id)

    def show_card(self, task_id: str, session_id: str) -> dict[str, Any] | None:
        card = self._card(task_id)
        if card is None:
            return None
        self._w("INSERT OR IGNORE INTO cards(task_id, session_id) VALUES (?,?)", (task_id, session_id))
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
        return _task_info(self.db, task_id)

    def outcome(self, task_id: str) -> tuple[TaskState, bytes | None, list[str | None]] | None:
        row = self.db.execute(
            "SELECT state, result, error_type, error_message, traceback FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        if row is None:
            return None
        return TaskState(row[0]), row[1], [row[2], row[3], row[4]]

    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        return _list_tasks(self.db, state, limit)

    def find_ids(self, ending: str, limit: int) -> list[str]:
        return _find_ids(self.db, ending, limit)

    def live_tasks(self) -> Iterator[StoredTask]:
        rows = self.db.execute(f"SELECT {_STORED} FROM tasks WHERE state IN {_LIVE_SQL} ORDER BY rowid").fetchall()
        return (_stored(r) for r in rows)

    def backlog(self, priority: int, after: int, limit: int) -> list[StoredTask]:
        if priority == 0:
            sql = "rowid > ? AND state='QUEUED' AND lock_key IS NULL AND priority=0 ORDER BY rowid LIMIT ?"
            rows = self.db.execute(f"SELECT {_STORED} FROM tasks WHERE {sql}", (after, limit))
        else:  # through tasks_prioritized, whose condition the WHERE repeats
            sql = (
                "priority=? AND state='QUEUED' AND priority != 0 AND rowid > ? AND lock_key IS NULL "
                "ORDER BY priority, rowid LIMIT ?"
            )
            rows = self.db.execute(f"SELECT {_STORED} FROM tasks WHERE {sql}", (priority, after, limit))
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
        return _counts(self.db)

    def exists(self, task_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM tasks WHERE id=?", (task_id,)).fetchone() is not None

    def events_after(
        self, after: int, limit: int = 500, *, task_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        return _events_after(self.db, after, limit, task_id, session_id)

    def retry_row(self, task_id: str) -> tuple[Any, ...] | None:
        row = self.db.execute(
            "SELECT name, state, lock_key, session_id, session_owner, args, priority, rate_key, retried_as "
            "FROM tasks WHERE id=?",
            (task_id,),
        ).fetchone()
        return tuple(row) if row else None

    def mark_retried(self, task_id: str, session_id: str | None, new_id: str) -> None:
        self._w("UPDATE tasks SET retried_as=? WHERE id=?", (new_id, task_id))
        self.add_event(task_id, session_id, "retried", {"retried_as": new_id})

    # ---- retention ---------------------------------------------------------------------------
    def prune_events(self, before: float, keep_max: int, batch: int) -> int:
        # events are appended in time order: the oldest ``batch`` by seq are the candidates, and
        # the first young one among them ends the run (no ts index); max(seq) bounds the count
        top = self.db.execute("SELECT max(seq) FROM events").fetchone()[0]
        if top is None:
            return 0
        last = None
        for seq, ts in self.db.execute("SELECT seq, ts FROM events ORDER BY seq LIMIT ?", (batch,)).fetchall():
            if ts >= before and seq > top - keep_max:
                break
            last = seq
        return 0 if last is None else self._w("DELETE FROM events WHERE seq <= ?", (last,)).rowcount

    def prune_finished(self, before: float, batch: int) -> dict[str, int]:
        rows = self.db.execute(  # +state: the tasks_finished index, in finishing order, not tasks_state
            f"SELECT id, state FROM tasks WHERE finished_at < ? AND +state IN {_TERMINAL_SQL} "
            "ORDER BY finished_at LIMIT ?",
            (before, batch),
        ).fetchall()
        pruned: dict[str, int] = {}
        for task_id, state in rows:
            self._w("DELETE FROM events WHERE task_id=?", (task_id,))
            self._w("DELETE FROM cards WHERE task_id=?", (task_id,))
            self._w("DELETE FROM tasks WHERE id=?", (task_id,))
            pruned[state] = pruned.get(state, 0) + 1
        return pruned

    # ---- schedules ---------------------------------------------------------------------------
    def register_schedules(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        for name, cron, tz in specs:
            self._w(
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
        self._w("UPDATE schedules SET last_slot=max(coalesce(last_slot, 0), ?) WHERE name=?", (slot, name))

    # ---- session key-values ------------------------------------------------------------------
    def kv_get(self, session_id: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).fetchone()
        return row[0] if row else None

    def kv_set(self, session_id: str, key: str, text: str) -> None:
        self._w(
            "INSERT INTO session_kv(session_id, key, value, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT(session_id, key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (session_id, key, text, time.time()),
        )

    def kv_delete(self, session_id: str, key: str) -> bool:
        return self._w("DELETE FROM session_kv WHERE session_id=? AND key=?", (session_id, key)).rowcount > 0

    def kv_items(self, session_id: str) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT key, value FROM session_kv WHERE session_id=? ORDER BY key", (session_id,))
        return [(k, v) for k, v in rows]


def _task_info(db: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
    row = db.execute(f"SELECT {_INFO} FROM tasks WHERE id=?", (task_id,)).fetchone()
    return _info(tuple(row)) if row else None


def _list_tasks(db: sqlite3.Connection, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
    if state:
        rows = db.execute(f"SELECT {_INFO} FROM tasks WHERE state=? ORDER BY rowid DESC LIMIT ?", (state, limit))
    else:
        rows = db.execute(f"SELECT {_INFO} FROM tasks ORDER BY rowid DESC LIMIT ?", (limit,))
    return [_info(tuple(r)) for r in rows]


def _find_ids(db: sqlite3.Connection, ending: str, limit: int) -> list[str]:
    rows = db.execute("SELECT id FROM tasks WHERE substr(id, -?) = ? LIMIT ?", (len(ending), ending, limit))
    return [r[0] for r in rows]


def _counts(db: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in db.execute("SELECT state, count(*) FROM tasks GROUP BY state")}


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
    QUEUED: "priority DESC, created_at ASC, id ASC",  # next to run first
    SCHEDULED: "coalesce(run_at, created_at) ASC, id ASC",  # next due first
    RUNNING: "coalesce(started_at, created_at) DESC, id DESC",  # a workflow from its submit
    SUCCEEDED: "finished_at DESC, id DESC",  # most recent first
    FAILED: "finished_at DESC, id DESC",
    CANCELLED: "finished_at DESC, id DESC",
}
_CARD_ROW = (
    "id, name, state, attempts, lock_key, session_id, created_at, started_at, finished_at, run_at, "
    "progress, error_type, error_message, slot"
)
MAX_PAGE = 200
# The board's columns: a live flow record (waiting for its steps: SCHEDULED with no run_at, the
# partial index tasks_scheduled finds those) is in Running; its steps (flow_id set) are in no column.
_LIVE_RECORD = "(state='SCHEDULED' AND run_at IS NULL AND name=?)"
_COLUMN = f"CASE WHEN {_LIVE_RECORD} THEN 'RUNNING' ELSE state END"
_IN_COLUMN = {
    QUEUED: ("state='QUEUED'", ()),
    SCHEDULED: ("state='SCHEDULED' AND (run_at IS NOT NULL OR name!=?)", (FLOW_RECORD,)),
    RUNNING: (f"(state='RUNNING' OR {_LIVE_RECORD})", (FLOW_RECORD,)),
    **{state: ("state=?", (state.value,)) for state in (SUCCEEDED, FAILED, CANCELLED)},
}


def _filters(name: str | None, session: str | None, lock: str | None, task_id: str | None) -> tuple[str, list[Any]]:
    """Substring filters (case-sensitive) on name, session id, lock key and id."""
    where, params = [], []
    for column, value in (("name", name), ("session_id", session), ("lock_key", lock), ("id", task_id)):
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


# ---- the board's Stats view (StoreReader.stats_rows): grouped here, assembled in ui/stats.py ----
_ARRIVAL = "coalesce(run_at, created_at)"
_DEPARTURE = "coalesce(started_at, finished_at)"
_STATS_SQL = {
    "finished": "SELECT CAST((finished_at - :since) / :step AS INTEGER) AS b, state, count(*) FROM tasks "
    "WHERE finished_at >= :since GROUP BY b, state",
    "arrivals": f"SELECT CAST(({_ARRIVAL} - :since) / :step AS INTEGER) AS b, name, count(*) FROM tasks "
    f"WHERE {_ARRIVAL} >= :since AND {_ARRIVAL} <= :now GROUP BY b, name",
    "departures": f"SELECT CAST(({_DEPARTURE} - :since) / :step AS INTEGER) AS b, name, count(*) FROM tasks "
    f"WHERE {_DEPARTURE} >= :since GROUP BY b, name",
    "queued_before": f"SELECT name, count(*) FROM tasks WHERE {_ARRIVAL} < :since "
    f"AND ({_DEPARTURE} IS NULL OR {_DEPARTURE} >= :since) GROUP BY name",
    "run_times": "SELECT name, finished_at - started_at FROM tasks WHERE finished_at >= :since "
    "AND started_at IS NOT NULL AND state IN ('SUCCEEDED', 'FAILED') ORDER BY finished_at DESC LIMIT :limit",
    "crashes": "SELECT CAST((ts - :since) / :step AS INTEGER) AS b, count(*) FROM events "
    "WHERE ts >= :since AND kind = 'state' AND data LIKE :crashed GROUP BY b",
    "restarts": "SELECT CAST((ts - :since) / :step AS INTEGER) AS b, count(*) FROM events "
    "WHERE ts >= :since AND kind = :actor_exit GROUP BY b",
}


def _stats_rows(db: sqlite3.Connection, since: float, step: float, limit: int) -> StatsRows:
    params: dict[str, object] = {"since": since, "step": step, "now": time.time(), "limit": limit}
    params.update(crashed=CRASHED_PATTERN, actor_exit=ACTOR_EXIT)
    rows = {key: [tuple(r) for r in db.execute(sql, params).fetchall()] for key, sql in _STATS_SQL.items()}
    return StatsRows(**rows)


class SQLiteReader(StoreReader):
    """Read-only connections to ``capsule.db`` (``mode=ro``, ``query_only``), one per thread.

    ``still``: nobody writes the file now (no supervisor runs, the CLI checked). Without a WAL
    file (a supervisor that stopped cleanly leaves none) it is then opened ``immutable``, since a
    plain read-only open of a WAL database creates its ``-wal`` and ``-shm`` files."""

    def __init__(self, path: Path, still: bool = False) -> None:
        self.path = path
        self._mode = "ro&immutable=1" if still and not path.with_name(path.name + "-wal").exists() else "ro"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode={self._mode}",
                uri=True,
                check_same_thread=False,
                timeout=10.0,
                isolation_level=None,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=1")
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            except sqlite3.OperationalError:  # no meta table: a store its supervisor is creating
                row = None
            if row is not None:
                try:
                    check_schema(int(row[0]), SCHEMA_VERSION, f"task store {str(self.path)!r}")
                except StateDirError:
                    conn.close()
                    raise
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

    def info(self, task_id: str) -> dict[str, Any] | None:
        return _task_info(self._db(), task_id)

    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        return _list_tasks(self._db(), state, limit)

    def counts(self) -> dict[str, int]:
        return _counts(self._db())

    def find_ids(self, ending: str, limit: int) -> list[str]:
        return _find_ids(self._db(), ending, limit)

    def last_seq(self) -> int:
        row = self._db().execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def stats_rows(self, since: float, step: float, limit: int) -> StatsRows:
        with self.snapshot():
            return _stats_rows(self._db(), since, step, limit)

    def board(
        self,
        *,
        name: str | None = None,
        session: str | None = None,
        lock: str | None = None,
        offsets: dict[str, int] | None = None,
        page_size: int = 50,
        names: bool = False,
        task_id: str | None = None,
    ) -> dict[str, Any]:
        where, params = _filters(name, session, lock, task_id and task_id.strip().lower())
        if params:  # a row that matches, or a workflow one of whose steps matches
            steps_of = f"SELECT flow_id FROM tasks WHERE flow_id IS NOT NULL AND {where}"
            where = f"({where} OR (flow_id IS NULL AND id IN ({steps_of})))"
            params = [*params, *params]
        offsets = offsets or {}
        page_size = max(1, min(MAX_PAGE, page_size))
        with self.snapshot():  # one snapshot for counts and pages
            db = self._db()
            counts: dict[str, int] = {}
            steps: dict[str, int] = {}
            for column, is_step, n in db.execute(  # one scan: cards per column, steps per state
                f"SELECT {_COLUMN} AS col, flow_id IS NOT NULL AS step, count(*) FROM tasks WHERE {where} "
                "GROUP BY col, step",
                [FLOW_RECORD, *params],
            ):
                (steps if is_step else counts)[column] = int(n)
            columns, cards = [], []
            for state in TaskState:
                count = counts.get(state.value, 0)
                offset = max(0, min(int(offsets.get(state.value, 0)), max(0, count - 1)))
                offset -= offset % page_size
                in_column, column_params = _IN_COLUMN[state]
                rows = db.execute(
                    f"SELECT {_CARD_ROW} FROM tasks WHERE {in_column} AND flow_id IS NULL AND {where} "
                    f"ORDER BY {_ORDER[state]} LIMIT ? OFFSET ?",
                    [*column_params, *params, page_size, offset],
                ).fetchall()
                tasks = [_card_row(r) for r in rows]
                cards += tasks
                columns.append(
                    {
                        "state": state.value,
                        "count": count,
                        "offset": offset,
                        "tasks": tasks,
                        "steps": steps.get(state.value, 0),
                    }
                )
            self._board_flows(db, cards)
            out: dict[str, Any] = {
                "columns": columns,
                "seq": self.last_seq(),
                "page_size": page_size,
                "total": sum(counts.values()),
            }
            if names:
                out["names"] = [r[0] for r in db.execute("SELECT DISTINCT name FROM tasks ORDER BY name LIMIT 500")]
        return out

    def _board_flows(self, db: sqlite3.Connection, cards: list[dict[str, Any]]) -> None:
        """The workflow cards' steps per state, running steps and kinds (``board_flows``): lookups
        in the index of steps (tasks_flow) and each record's first ``flow`` event."""
        ids = json.dumps([c["id"] for c in cards if c["name"] == FLOW_RECORD])
        if ids == "[]":
            return
        of_page = "flow_id IN (SELECT value FROM json_each(?))"
        states = db.execute(
            f"SELECT flow_id, state, count(*) FROM tasks WHERE {of_page} GROUP BY flow_id, state", (ids,)
        )
        running = db.execute(
            f"SELECT flow_id, id, name FROM tasks WHERE {of_page} AND state='RUNNING' ORDER BY started_at, id", (ids,)
        )
        shapes = db.execute(
            "SELECT task_id, json_type(data, '$.value'), CASE WHEN json_type(data, '$.value') = 'text' "
            "THEN json_type(data, '$.inputs.' || json_quote(json_extract(data, '$.value'))) END FROM events "
            "WHERE seq IN (SELECT (SELECT seq FROM events WHERE task_id = f.value AND kind = 'flow' "
            "ORDER BY seq LIMIT 1) FROM json_each(?) f) AND json_valid(data)",
            (ids,),
        )
        board_flows(cards, states.fetchall(), running.fetchall(), shapes.fetchall())

    def task_detail(self, task_id: str, max_events: int = 200) -> dict[str, Any] | None:
        with self.snapshot():
            db = self._db()
            row = db.execute(
                f"SELECT {_CARD_ROW}, flow_id, session_owner, traceback, length(args) AS args_bytes, "
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

    def flow_steps(self, flow_id: str) -> dict[str, Any] | None:
        with self.snapshot():
            db = self._db()
            row = db.execute(
                "SELECT data FROM events WHERE task_id=? AND kind='flow' ORDER BY seq LIMIT 1", (flow_id,)
            ).fetchone()
            if row is not None:
                record = _json(row[0])
            else:  # its event was pruned (retention): the steps that name it, in submit order
                steps = [r[0] for r in db.execute("SELECT id FROM tasks WHERE flow_id=? ORDER BY rowid", (flow_id,))]
                if not steps:
                    return None
                record = {"steps": steps, "inputs": {}, "on_error": None, "value": None}
            ids = flow_members(record)
            found: dict[str, dict[str, Any]] = {}
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                for r in db.execute(
                    f"SELECT id, name, state, attempts, error_type, error_message FROM tasks WHERE id IN ({marks})",
                    part,
                ):
                    found[r[0]] = _step_row(r)
        return {**record, "step_rows": [found[i] for i in ids if i in found]}

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


def _step_row(r: Any) -> dict[str, Any]:
    """One workflow step as the board shows it."""
    error = f"{r[4]}: {r[5]}" if r[4] else None
    return {"id": r[0], "name": r[1], "state": r[2], "attempts": int(r[3]), "error": error}
