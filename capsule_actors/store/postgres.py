"""The PostgreSQL store: the same tables as SQLite's, in one PostgreSQL schema per app.

Chosen with ``App(store="postgresql://…")``, ``--store`` or ``CAPSULE_STORE``; the state directory
still holds the sockets, journals and pid lock. psycopg 3 (the ``[postgres]`` extra). The
guarantees of ``base.py`` are kept with PostgreSQL's own means:

- one connection for the supervisor's loop, one transaction per turn (psycopg opens it at the
  first statement, ``commit()`` ends it), so acknowledgements follow a commit and concurrent
  submits share one (group commit); ``synchronous_commit`` is the server's (``on`` by default:
  a commit is on disk before any acknowledgement);
- submit order is ``tasks.seq`` and event order ``events.seq`` (sequences; one writer, so
  sequence order is commit order); a known task id is an ``ON CONFLICT DO NOTHING``;
- each per-task write is one round trip: its row and its event in one statement (a CTE), a
  batch of submits one ``unnest`` statement;
- readers (board, clock) use their own connections, a read-only REPEATABLE READ transaction per
  snapshot; MVCC never makes them wait for the writer nor the writer for them.

A lost connection (a restarting or failing-over server, a cut network) loses nothing: the store
keeps every write of the open transaction (``_redo``) until it commits, and when a statement or
the COMMIT finds the connection gone it reconnects and redoes them, waiting up to ``OUTAGE``
seconds (``?outage=SECONDS`` in the URL) (the supervisor's loop waits with it: clients' requests queue, which is the
back-pressure); past that it raises ``StoreUnavailable`` and the supervisor stops. A COMMIT that
finds the server's disk full is redone into a new transaction and raises ``StoreFull``, as on
SQLite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, Fenced, StateDirError, StoreFull, StoreUnavailable
from ..states import LIVE, TaskState
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
from .cluster import FENCE_FUNCTION, POOL, REFUSED, shard_of
from .cluster import SCHEMA as CLUSTER_SCHEMA

log = logging.getLogger("capsule_actors.store")

SCHEMA_VERSION = 4
OUTAGE = 60.0  # seconds the supervisor waits for a lost server before it stops (StoreUnavailable)
SIZE_EVERY = 10.0  # seconds between looks at the database's size (status)
PIPELINED_INSERT = 64 << 10  # bytes of arguments an insert may carry inside the pipeline (more: plain mode)
_LIVE_SQL = "('QUEUED','SCHEDULED','RUNNING')"
_TERMINAL_SQL = "('SUCCEEDED','FAILED','CANCELLED')"
_CONNECT_TIMEOUT = 10  # seconds: an unreachable server is an error at start, not a hang
# a dead peer is noticed in ~25 s (TCP keepalives), a statement never runs longer than a minute
_SESSION = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
_OPTIONS = "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=600000"

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.tasks (
    seq bigserial UNIQUE,
    id text PRIMARY KEY,
    name text NOT NULL,
    state text NOT NULL,
    lock_key text,
    session_id text,
    session_owner text,
    args bytea,
    result bytea,
    error_type text,
    error_message text,
    traceback text,
    attempts integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    run_at double precision,
    progress double precision,
    slot text
);
-- no index on state itself (every state change would add an entry to it): the live tasks have one
CREATE INDEX IF NOT EXISTS tasks_live ON {s}.tasks(seq) WHERE state IN ('QUEUED', 'SCHEDULED', 'RUNNING');
CREATE INDEX IF NOT EXISTS tasks_scheduled ON {s}.tasks(run_at) WHERE state = 'SCHEDULED';
CREATE INDEX IF NOT EXISTS tasks_backlog ON {s}.tasks(seq) WHERE state = 'QUEUED' AND lock_key IS NULL;
CREATE INDEX IF NOT EXISTS tasks_finished ON {s}.tasks(finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.events (
    seq bigserial PRIMARY KEY,
    task_id text NOT NULL,
    session_id text,
    kind text NOT NULL,
    data text NOT NULL,
    ts double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON {s}.events(task_id, seq);
CREATE INDEX IF NOT EXISTS events_session ON {s}.events(session_id, seq) WHERE session_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.session_kv (
    session_id text NOT NULL,
    key text NOT NULL,
    value text NOT NULL,
    updated_at double precision NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE TABLE IF NOT EXISTS {s}.schedules (
    name text PRIMARY KEY,
    cron text NOT NULL,
    tz text NOT NULL,
    registered_at double precision NOT NULL,
    last_slot double precision
);
CREATE TABLE IF NOT EXISTS {s}.cards (
    task_id text NOT NULL,
    session_id text NOT NULL,
    PRIMARY KEY (task_id, session_id)
);
-- version 2: priorities and keyed rate limits
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS rate_key text;
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS retried_as text;
-- the backlog of a priority other than 0 (tasks of priority 0 never enter it)
CREATE INDEX IF NOT EXISTS tasks_prioritized ON {s}.tasks(priority, seq)
    WHERE state = 'QUEUED' AND lock_key IS NULL AND priority <> 0;
-- version 3: a workflow step's workflow (its flow record's id), written with the record's `flow`
-- event (the board shows a workflow as one card), in an index of step rows only
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS flow_id text;
CREATE INDEX IF NOT EXISTS tasks_flow ON {s}.tasks(flow_id) WHERE flow_id IS NOT NULL;
-- version 4: a cluster of supervisors on this schema (store/cluster.py)
"""
    + CLUSTER_SCHEMA
)
# Version 3 on a store of an older version: the steps of the workflows recorded before, from their
# `flow` events (run once, when the version goes up).
_LINK_RECORDED_FLOWS = """
UPDATE {s}.tasks t SET flow_id = f.flow FROM (
    SELECT e.task_id AS flow, s.step FROM {s}.events e,
        jsonb_array_elements_text(CASE WHEN jsonb_typeof(e.data::jsonb -> 'steps') = 'array'
                                  THEN e.data::jsonb -> 'steps' ELSE '[]'::jsonb END) AS s(step)
    WHERE e.kind = 'flow'
    UNION ALL
    SELECT task_id, data::jsonb ->> 'on_error' FROM {s}.events
    WHERE kind = 'flow' AND jsonb_typeof(data::jsonb -> 'on_error') = 'string'
) f WHERE t.id = f.step
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
_STORED = "seq, id, name, state, lock_key, session_id, session_owner, attempts, run_at, slot, priority, rate_key"
_EVENT = "INSERT INTO {s}.events(task_id, session_id, kind, data, ts) VALUES (%s, %s, %s, %s, %s)"
_ONE_ROW = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_ROWS = (
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[], "
    "%s::float8[], %s::float8[], %s::int4[], %s::text[])"
)
# a cluster member's inserts also say who holds the task, who took it in and its lock key's shard
_MEMBER_ONE_ROW = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_MEMBER_ROWS = _ROWS[:-1] + ", %s::int8[], %s::int8[], %s::int4[])"
_FENCE = "SELECT {s}.fence(%s)"  # store/cluster.py FENCE_FUNCTION: raises REFUSED unless the member is live
_NOTE_BYTES = 7900  # a NOTIFY payload must stay under 8000 bytes
EV_NOTE_EVERY = 0.05  # seconds between a member's "ev" notes (events written: feeds elsewhere look again)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a postgresql:// store needs psycopg 3: pip install 'capsule_actors[postgres]'") from None
    return psycopg


def redact(url: str) -> str:
    """The URL without its password (for errors and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_OURS = ("schema", "outage")  # URL parameters for us, not for libpq


def split_url(url: str, app_name: str) -> tuple[str, str]:
    """(libpq URL, schema): ``?schema=NAME`` chooses the schema (else ``capsule_<app name>``), so
    several apps share a database; every parameter but ours (``sslmode``, ``host``…) goes to libpq."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k not in _OURS])
    schema = schema or "capsule_" + re.sub(r"[^a-z0-9_]", "_", app_name.lower())
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ConfigError(f"store schema {schema!r}: use 1-63 lowercase letters, digits and '_'")
    return urlunsplit(parts._replace(query=rest)), schema


def outage_of(url: str) -> float:
    """``?outage=SECONDS``: how long the supervisor waits for a lost server (default OUTAGE)."""
    value = next((v for k, v in parse_qsl(urlsplit(url).query) if k == "outage"), None)
    if value is None:
        return OUTAGE
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(f"store outage={value!r}: expected seconds, more than 0 and at most 3600")
    return seconds


def _connect(url: str, app_name: str, *, autocommit: bool) -> tuple[Any, str]:
    psycopg = _psycopg()
    libpq_url, schema = split_url(url, app_name)
    try:
        conn = psycopg.connect(
            libpq_url, autocommit=autocommit, connect_timeout=_CONNECT_TIMEOUT, options=_OPTIONS, **_SESSION
        )
    except psycopg.Error as exc:
        raise StateDirError(
            f"cannot reach the PostgreSQL store {redact(url)}: {str(exc).strip()}; check that the server runs, "
            "the URL (user, host, port, database), and the password (PGPASSFILE, PGPASSWORD)"
        ) from None
    return conn, schema


def listener(store: PostgresStore) -> Any:
    """A connection of its own that LISTENs on the store's channel (a cluster's wake-ups), its
    socket non-blocking for the supervisor's poller."""
    conn, schema = _connect(store._secret_url, store._app_name, autocommit=True)
    conn.execute(f'LISTEN "{schema}"')
    conn.pgconn.nonblocking = 1
    return conn


def notes(conn: Any) -> list[str]:
    """The NOTIFY payloads a ``listener`` connection received, without waiting; raises when the
    connection broke."""
    pgconn = conn.pgconn
    pgconn.consume_input()
    payloads = []
    while (note := pgconn.notifies()) is not None:
        payloads.append(note.extra.decode())
    return payloads


def _stored(row: tuple[Any, ...]) -> StoredTask:
    return StoredTask(int(row[0]), row[1], row[2], TaskState(row[3]), *row[4:])


def _info(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(INFO_FIELDS, row))


# reads the supervisor's store and the readers share
_INFO_SQL = f"SELECT {_INFO} FROM {{s}}.tasks WHERE id=%s"
_COUNTS_SQL = "SELECT state, count(*) FROM {s}.tasks GROUP BY state"
_FIND_IDS_SQL = "SELECT id FROM {s}.tasks WHERE right(id, %s) = %s LIMIT %s"  # a scan: short ids only


def _list_sql(state: TaskState | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    if state:
        return f"SELECT {_INFO} FROM {{s}}.tasks WHERE state=%s ORDER BY seq DESC LIMIT %s", (state.value, limit)
    return f"SELECT {_INFO} FROM {{s}}.tasks ORDER BY seq DESC LIMIT %s", (limit,)


class _Rows:
    """A statement's answer, read at once (in pipeline mode, reading it is the round trip)."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, cur: Any) -> None:
        self.rows: list[tuple[Any, ...]] = cur.fetchall() if cur.description else []
        self.rowcount = int(cur.rowcount)

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def value(self) -> Any:
        """The first column of the first row (an aggregate's answer)."""
        return self.rows[0][0]


class PostgresStore(TaskStore):
    """The supervisor's store on PostgreSQL: one connection, used from the loop thread only."""

    def __init__(self, url: str, app_name: str) -> None:
        self.url = redact(url)
        self._secret_url, self._app_name = url, app_name  # kept to reconnect
        self.db, self.schema = _connect(url, app_name, autocommit=False)
        self._s = self.schema
        try:
            self._migrate()
        except Exception:
            self.db.close()
            raise
        self._pipeline()
        self._dirty = False
        self._redo: list[tuple[str, Any]] = []  # the open transaction's writes, in order
        self._gone = False  # the server stayed away past the outage: every call raises StoreUnavailable
        self.outage = outage_of(url)
        self.slot_pending = False
        self._touched: set[str] = set()
        self._touched_sessions: set[str] = set()
        self._any_event = False
        self._cards: dict[str, set[str]] = {}  # task id -> sessions showing its card
        rows = self._q(
            "SELECT c.task_id, c.session_id FROM {s}.cards c JOIN {s}.tasks t ON t.id = c.task_id "
            f"WHERE t.state IN {_LIVE_SQL}"
        ).fetchall()
        for task_id, session_id in rows:
            self._cards.setdefault(task_id, set()).add(session_id)
        self.db.commit()
        self._bytes = 0
        self._next_size = 0.0
        self._args = KeptArgs()
        # A cluster member (store/cluster.py): its id fences every write transaction, which
        # begins with fence(member) (``_w``); NOTIFY payloads go at commit; the tasks taken in by
        # another member are told when they end here.
        self.member: int | None = None
        self.notes: set[str] = set()
        self.notify_done: set[str] = set()
        self._done: list[str] = []
        self._session_sql = ""  # settings of this connection, made again after a reconnect
        self._evented = False  # events written since the last "ev" note (a cluster's event feeds)
        self._ev_noted = 0.0

    def _q(self, sql: str, params: Any = None) -> _Rows:
        """A read of this schema (``{s}`` in ``sql`` names it), riding out a lost connection."""
        rows = self._run(sql.replace("{s}", self._s), params, write=False, wait=True)
        assert rows is not None
        return rows

    def _w(self, sql: str, params: Any = None, *, wait: bool = False, big: bool = False) -> _Rows | None:
        """A write of the open transaction, kept until it commits (a lost connection redoes it).
        Sent without waiting for its answer (pipeline mode) unless ``wait``: it counts from the
        next statement that waits, or the COMMIT. ``big`` (a map()'s batch) leaves pipeline mode
        for that one statement: a large statement inside a pipeline can stall half-sent."""
        if not self._dirty and self.member is not None:  # a member's transaction begins with its fence
            self._dirty = True
            self._run(_FENCE.replace("{s}", self._s), (self.member,), write=True, wait=False)
        self._dirty = True
        return self._run(sql.replace("{s}", self._s), params, write=True, wait=wait or big, big=big)

    def _run(self, sql: str, params: Any, write: bool, wait: bool, big: bool = False) -> _Rows | None:
        if self._gone:
            raise self._unavailable("it was lost")
        if write:
            self._redo.append((sql, params))
        try:
            if big:
                return self._outside_pipeline(sql, params)
            cur = self.db.execute(sql, params)
            if not wait:
                return None
            self._pipe.sync()  # the answers so far, this one's included (and errors, if any)
            return _Rows(cur)
        except Exception as exc:
            self._refuse_if_fenced(exc)
            if not self._lost(exc):  # an error of a statement (this one, or one sent before it)
                self._recover_statement_error(exc)
                raise
            cur = self._reconnect(exc)
            if not write:
                cur = self.db.execute(sql, params)
                self._pipe.sync()
            return _Rows(cur) if wait or big else None

    def _lost(self, exc: BaseException | None = None) -> bool:
        """The connection is gone, or going (not just a statement that failed): a broken
        connection, or an error of class 08 (connection) or 57 (a server shutting down)."""
        psycopg = _psycopg()
        if exc is not None and str(getattr(exc, "sqlstate", None) or "")[:2] in ("08", "57"):
            return True
        return bool(self.db.broken or self.db.closed or self.db.pgconn.status == psycopg.pq.ConnStatus.BAD)

    def _outside_pipeline(self, sql: str, params: Any) -> _Rows:
        """One statement in plain mode (leaving the pipeline sends and answers what it holds)."""
        self._pipe_mode.__exit__(None, None, None)
        try:
            return _Rows(self.db.execute(sql, params))
        finally:
            if not self._lost():
                self._pipeline()

    def _pipeline(self) -> None:
        """Pipeline mode: statements whose answer nobody waits for go without a round trip each."""
        self._pipe_mode = self.db.pipeline()
        self._pipe = self._pipe_mode.__enter__()

    def _recover_statement_error(self, exc: BaseException) -> None:
        """A statement failed (our bug, or a constraint): the transaction is aborted; roll it back
        and redo the writes that still apply, so what the supervisor believes stays recorded."""
        log.error("a statement of the PostgreSQL store failed (%s): redoing the open transaction", exc)
        with contextlib.suppress(Exception):
            self._pipe_mode.__exit__(None, None, None)
        self.db.rollback()
        kept = []
        for sql, params in self._redo:
            try:
                with self.db.transaction():  # a savepoint: a write that fails again is dropped alone
                    self.db.execute(sql, params)
                kept.append((sql, params))
            except Exception as again:
                self._refuse_if_fenced(again)
                log.error("dropped a write that fails again: %s (%s)", sql[:120], again)
        self._redo = kept
        self._pipeline()

    def _reconnect(self, cause: BaseException) -> Any:
        """The connection broke: connect again and redo the open transaction's writes, trying for
        up to the outage; returns the last write's cursor (the statement that failed, if a write)."""
        deadline, delay = time.monotonic() + self.outage, 0.1
        log.error("lost the PostgreSQL store %s (%s): reconnecting, for up to %.0f s", self.url, cause, self.outage)
        while True:
            with contextlib.suppress(Exception):
                self.db.close()
            try:
                self.db, _ = _connect(self._secret_url, self._app_name, autocommit=False)
                if self._session_sql:
                    self.db.execute(self._session_sql)
                cur = None
                for sql, params in self._redo:  # in plain mode: each answered before the next
                    cur = self.db.execute(sql, params)
                self._pipeline()
                log.warning("the PostgreSQL store %s is back: %d writes redone", self.url, len(self._redo))
                return cur
            except StateDirError as exc:
                cause = exc
            except Exception as exc:
                self._refuse_if_fenced(exc)
                if not self._lost(exc):
                    raise
                cause = exc
            if time.monotonic() + delay > deadline:
                self._gone = True
                raise self._unavailable(str(cause))
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _unavailable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the PostgreSQL store {self.url} could not be reached for {self.outage:g} s ({why}); the supervisor "
            "stops: every task it acknowledged is in the store or in a client's journal, and a restart resumes them"
        )

    def _migrate(self) -> None:
        """Create the schema, or check the one there is: a newer version than ours is refused."""
        # one migrator at a time, from before the schema exists (two members starting together
        # would both try to create it)
        self.db.execute(f"SELECT pg_advisory_xact_lock(hashtext('{self._s}'))")
        self.db.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
        current = None
        if self.db.execute("SELECT to_regclass(%s)", (f"{self._s}.meta",)).fetchone()[0] is not None:
            row = self.db.execute(f"SELECT value FROM {self._s}.meta WHERE key='schema_version'").fetchone()
            current = int(row[0]) if row else None
        # DDL only when the schema is older (or new): a cluster member joining must not take the
        # exclusive locks of ALTER TABLE while the other members work
        ddl = current is None or current < SCHEMA_VERSION
        for statement in _SCHEMA.split(";") if ddl else []:
            if statement.strip():
                self.db.execute(statement.replace("{s}", self._s))
        # the fence, made again at each start (no table lock; a function body has semicolons of its own)
        self.db.execute(FENCE_FUNCTION.replace("{s}", self._s))
        self.db.execute(
            f"INSERT INTO {self._s}.meta(key, value) VALUES ('schema_version', %s) ON CONFLICT DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        found = int(self.db.execute(f"SELECT value FROM {self._s}.meta WHERE key='schema_version'").fetchone()[0])
        if found < SCHEMA_VERSION:  # the statements above brought an older schema up to date
            if found < 3:
                self.db.execute(_LINK_RECORDED_FLOWS.replace("{s}", self._s))
            self.db.execute(f"UPDATE {self._s}.meta SET value=%s WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            found = SCHEMA_VERSION
        self.db.commit()
        if found > SCHEMA_VERSION:
            raise StateDirError(
                f"the PostgreSQL store {self.url} (schema {self._s}) has schema version {found}, newer than "
                f"this capsule_actors knows ({SCHEMA_VERSION}): run the version that wrote it"
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pipe_mode.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            self.db.close()

    # ---- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        """Nothing to do: psycopg opens the turn's transaction at its first statement."""

    def commit(self) -> None:
        if self._gone:
            raise self._unavailable("it was lost")
        if self.member is not None and self._dirty:
            self._send_notes()
        try:
            self.db.commit()
        except Exception as exc:
            self._refuse_if_fenced(exc)
            psycopg = _psycopg()
            if isinstance(exc, psycopg.errors.DiskFull):  # rolled back: open it again with its writes
                self.db.rollback()
                try:
                    for sql, params in self._redo:
                        self.db.execute(sql, params)
                except Exception as again:
                    self._refuse_if_fenced(again)
                    raise
                self._dirty = False
                raise StoreFull(f"no room on the PostgreSQL store {self.url}'s server: {exc}") from None
            if self._lost(exc):  # the COMMIT may or may not have happened: redo (idempotent but for
                self._reconnect(exc)  # a repeated event) and commit
            else:  # a write sent before it failed: the rest is redone without it
                self._recover_statement_error(exc)
            self.db.commit()
        self._redo.clear()
        self._dirty = False
        self.slot_pending = False

    def dirty(self) -> bool:
        return self._dirty

    def become_member(self, member: int, lease: float) -> None:
        """This store's writes are now a cluster member's: fenced by its row, and the server ends
        the member's session if it sits in an open transaction for a lease (a member cut off
        mid-transaction would otherwise hold the lock on its own row, which a takeover skips)."""
        self.member = member
        self.outage = min(self.outage, lease)  # past its lease a member is fenced anyway
        self._session_sql = f"SET idle_in_transaction_session_timeout = {max(1000, int(lease * 1000))}"
        self._w(self._session_sql)

    def _send_notes(self) -> None:
        """The turn's wake-ups for the other members (NOTIFY: delivered when this commits)."""
        if self._done:
            ids, self._done = self._done, []
            chunk: list[str] = []
            size = 0
            for task_id in ids:
                chunk.append(task_id)
                size += len(task_id) + 1
                if size > _NOTE_BYTES:
                    self.notes.add("done " + " ".join(chunk))
                    chunk, size = [], 0
            if chunk:
                self.notes.add("done " + " ".join(chunk))
        if self._evented and time.monotonic() - self._ev_noted >= EV_NOTE_EVERY:
            self._evented, self._ev_noted = False, time.monotonic()
            self.notes.add("ev")  # other members' event long polls look again
        for note in sorted(self.notes):
            self._w("SELECT pg_notify(%s, %s)", (self.schema, note))
        self.notes.clear()

    def _refuse_if_fenced(self, exc: BaseException) -> None:
        """The fence refused this member's transaction (it was taken over): nothing of it is
        written, ever -- roll it back, forget its writes, and raise Fenced."""
        if getattr(exc, "sqlstate", None) != REFUSED:
            return
        self.abort()
        raise Fenced(f"cluster member {self.member} was taken over by another member: its writes are refused")

    def abort(self) -> None:
        """Roll the open transaction back and forget its writes (and the notes they made)."""
        with contextlib.suppress(Exception):
            self._pipe_mode.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            self.db.rollback()
        self._redo.clear()
        self._dirty = False
        self._done.clear()
        self.notes.clear()
        with contextlib.suppress(Exception):
            self._pipeline()

    # ---- housekeeping ------------------------------------------------------------------------
    def maintain(self) -> None:
        """PostgreSQL checkpoints and vacuums by itself; look at the database's size now and then."""
        now = time.monotonic()
        if now >= self._next_size and not self._redo:
            self._next_size = now + SIZE_EVERY
            with contextlib.suppress(Exception):
                self._bytes = int(self.db.execute("SELECT pg_database_size(current_database())").fetchone()[0])
                self.db.commit()

    def check(self) -> None:
        """The schema was checked (and its version) when the store was opened: nothing more here;
        PostgreSQL checks its own pages (data checksums, if the cluster has them)."""

    def space(self) -> StoreSpace:
        return StoreSpace(self.url, self._bytes, 0, -1, False)  # free space: the server's to watch

    # ---- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, rows: Iterable[NewTask], pooled: Collection[str] = ()) -> list[tuple[str, int]]:
        rows = list(rows)
        if not rows:
            return []
        params: list[Any]
        columns = "id, name, state, lock_key, session_id, session_owner, args, created_at, run_at, priority, rate_key"
        placed = self._placed()
        if placed is not None:  # a cluster's: who holds the task, who took it in, its lock key's shard
            owner, origin = placed
            rows_in: list[Any] = [
                (*r, POOL if r.id in pooled else owner, origin, None if r.lock_key is None else shard_of(r.lock_key))
                for r in rows
            ]
            columns += ", owner, origin, shard"
            one, many = _MEMBER_ONE_ROW, _MEMBER_ROWS
        else:
            rows_in, one, many = rows, _ONE_ROW, _ROWS
        if len(rows) == 1:  # a plain submit: no arrays to build and unpack
            values, params = one, [*rows_in[0]]
        else:  # a map(): every row in one statement
            values, params = many, [list(c) for c in zip(*rows_in)]
        new = self._w(
            f"WITH new AS (INSERT INTO {{s}}.tasks({columns}) {values} ON CONFLICT (id) DO NOTHING "
            "RETURNING seq, id, name, state, session_id), "
            "ev AS (INSERT INTO {s}.events(task_id, session_id, kind, data, ts) "
            "SELECT id, session_id, 'state', json_build_object('state', state, 'attempt', 0, 'name', name)::text, %s "
            "FROM new ORDER BY seq) "
            "SELECT id, seq, session_id FROM new ORDER BY seq",
            [*params, time.time()],
            wait=True,
            big=sum(len(row.args) for row in rows) > PIPELINED_INSERT,
        )
        assert new is not None
        by_id = {row.id: row for row in rows}
        for task_id, _, session_id in new.rows:
            self._noted(task_id, session_id)
            self._args.keep(task_id, by_id[task_id].args)
        return [(task_id, int(seq)) for task_id, seq, _ in new.rows]

    def _placed(self) -> tuple[int, int | None] | None:
        """(owner, origin) of the tasks this store inserts: a cluster member's are its own, taken
        in by it; None without a cluster (``store/submitter.py`` puts its tasks in the pool)."""
        return None if self.member is None else (self.member, self.member)

    def args(self, task_id: str) -> bytes:
        kept = self._args.take(task_id)
        if kept is not None:
            return kept
        row = self._q("SELECT args FROM {s}.tasks WHERE id=%s", (task_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def set_args(self, task_id: str, args: bytes) -> None:
        self._w("UPDATE {s}.tasks SET args=%s WHERE id=%s", (args, task_id))
        self._args.keep(task_id, args)

    def lock_step(self, task_id: str, key: str, args: bytes) -> None:
        self._w(
            "UPDATE {s}.tasks SET seq=nextval(pg_get_serial_sequence('{s}.tasks', 'seq')), lock_key=%s, args=%s, "
            "shard=%s WHERE id=%s",
            (key, args, None if self.member is None else shard_of(key), task_id),
        )
        self._args.keep(task_id, args)

    def results(self, task_ids: list[str]) -> dict[str, bytes]:
        rows = self._q("SELECT id, result FROM {s}.tasks WHERE id = ANY(%s)", (task_ids,)).fetchall()
        return {task_id: bytes(result or b"") for task_id, result in rows}

    def flow_waiting(self) -> list[tuple[str, str | None, bytes]]:
        rows = self._q(
            "SELECT id, session_id, args FROM {s}.tasks WHERE state='SCHEDULED' AND run_at IS NULL"
            f"{self._owned()} ORDER BY seq"
        ).fetchall()
        return [(task_id, sid, bytes(args or b"")) for task_id, sid, args in rows]

    def _with_event(
        self, sql: str, params: tuple[Any, ...], task_id: str, session_id: str | None, data: dict[str, Any] | str
    ) -> None:
        """One statement: a change of the task's row (``sql``: an UPDATE) and its state event
        (``data``: a dict, or JSON text already: see ``quoted``)."""
        text = data if isinstance(data, str) else json.dumps(data)
        event = (task_id, session_id, "state", text, time.time())
        self._w(f"WITH u AS ({sql}), ev AS ({_EVENT}) SELECT 1", (*params, *event))
        self._noted(task_id, session_id, "state")

    def mark_running(self, task_id: str, session_id: str | None, attempt: int, slot: str, now: float) -> None:
        self._with_event(
            "UPDATE {s}.tasks SET state='RUNNING', attempts=%s, slot=%s, started_at=%s WHERE id=%s",
            (attempt, slot, now, task_id),
            task_id,
            session_id,
            f'{{"state": "RUNNING", "attempt": {int(attempt)}, "slot": {quoted(slot)}}}',
        )

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
        data = {"state": state, "error": f"{etype}: {emsg}"} if etype else f'{{"state": {quoted(state)}}}'
        self._with_event(
            "UPDATE {s}.tasks SET state=%s, result=%s, error_type=%s, error_message=%s, traceback=%s, "
            "finished_at=%s, run_at=NULL WHERE id=%s RETURNING 1",
            (state.value, result, etype, emsg, tb, now, task_id),
            task_id,
            session_id,
            data,
        )
        if task_id in self.notify_done:  # taken in by another member: it hears at our commit
            self.notify_done.discard(task_id)
            self._done.append(task_id)

    def requeue(
        self,
        task_id: str,
        session_id: str | None,
        run_at: float | None,
        error: Error | None,
        attempts: int | None = None,
    ) -> None:
        etype, emsg, tb = error or (None, None, None)
        data: dict[str, Any] = {"state": "QUEUED", "retry_at": run_at}
        if error:
            data["error"] = f"{etype}: {emsg}"
        self._with_event(
            "UPDATE {s}.tasks SET state='QUEUED', run_at=%s, attempts=coalesce(%s, attempts), "
            "error_type=CASE WHEN %s THEN %s ELSE error_type END, "
            "error_message=CASE WHEN %s THEN %s ELSE error_message END, "
            "traceback=CASE WHEN %s THEN %s ELSE traceback END WHERE id=%s RETURNING 1",
            (run_at, attempts, bool(error), etype, bool(error), emsg, bool(error), tb, task_id),
            task_id,
            session_id,
            data,
        )

    def set_progress(self, task_id: str, fraction: float) -> None:
        self._w("UPDATE {s}.tasks SET progress=%s WHERE id=%s", (fraction, task_id))

    def add_event(self, task_id: str, session_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self._w(_EVENT, (task_id, session_id, kind, json.dumps(data), time.time()))
        if kind == FLOW_EVENT:  # a workflow's steps (recorded in this transaction): they are its own
            self._w("UPDATE {s}.tasks SET flow_id=%s WHERE id = ANY(%s)", (task_id, flow_members(data)))
        self._noted(task_id, session_id, kind)

    def _noted(self, task_id: str, session_id: str | None, kind: str = "") -> None:
        """An event was added: who to wake, and the card updates it causes."""
        self._touched.add(task_id)
        self._any_event = self._evented = True
        if session_id is not None:
            self._touched_sessions.add(session_id)
        if task_id in self._cards and kind in ("state", "progress"):
            self._update_cards(task_id)

    def show_card(self, task_id: str, session_id: str) -> dict[str, Any] | None:
        card = self._card(task_id)
        if card is None:
            return None
        self._w(
            "INSERT INTO {s}.cards(task_id, session_id) VALUES (%s, %s) ON CONFLICT DO NOTHING", (task_id, session_id)
        )
        if card["state"] in LIVE:
            self._cards.setdefault(task_id, set()).add(session_id)
        return card

    def _card(self, task_id: str) -> dict[str, Any] | None:
        row = self._q(
            "SELECT name, state, attempts, progress, error_type, error_message, created_at, started_at, "
            "finished_at FROM {s}.tasks WHERE id=%s",
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
        row = self._q(_INFO_SQL, (task_id,)).fetchone()
        return _info(row) if row else None

    def outcome(self, task_id: str) -> tuple[TaskState, bytes | None, list[str | None]] | None:
        row = self._q(
            "SELECT state, result, error_type, error_message, traceback FROM {s}.tasks WHERE id=%s", (task_id,)
        ).fetchone()
        if row is None:
            return None
        return TaskState(row[0]), bytes(row[1]) if row[1] is not None else None, [row[2], row[3], row[4]]

    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        return [_info(r) for r in self._q(*_list_sql(state, limit)).fetchall()]

    def find_ids(self, ending: str, limit: int) -> list[str]:
        return [r[0] for r in self._q(_FIND_IDS_SQL, (len(ending), ending, limit)).fetchall()]

    def _owned(self) -> str:
        """The condition on a member's own rows (none without a cluster)."""
        return "" if self.member is None else f" AND owner = {int(self.member)}"

    def live_tasks(self) -> Iterator[StoredTask]:
        rows = self._q(
            f"SELECT {_STORED} FROM {{s}}.tasks WHERE state IN {_LIVE_SQL}{self._owned()} ORDER BY seq"
        ).fetchall()
        return (_stored(r) for r in rows)

    def backlog(self, priority: int, after: int, limit: int) -> list[StoredTask]:
        where = "seq > %s AND state='QUEUED' AND lock_key IS NULL AND priority = %s"
        if priority != 0:  # through tasks_prioritized, whose condition the WHERE repeats
            where += " AND priority <> 0"
        rows = self._q(
            f"SELECT {_STORED} FROM {{s}}.tasks WHERE {where} ORDER BY seq LIMIT %s", (after, priority, limit)
        ).fetchall()
        return [_stored(r) for r in rows]

    def live_locked(self) -> list[tuple[str, str, str]]:
        rows = self._q(
            f"SELECT id, name, lock_key FROM {{s}}.tasks WHERE state IN {_LIVE_SQL} AND lock_key IS NOT NULL"
            f"{self._owned()} ORDER BY seq"
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def live_task(self, task_id: str) -> StoredTask | None:
        row = self._q(f"SELECT {_STORED} FROM {{s}}.tasks WHERE id=%s AND state IN {_LIVE_SQL}", (task_id,)).fetchone()
        return _stored(row) if row else None

    def count_state(self, state: TaskState) -> int:
        # the state as a literal, so a partial index (SCHEDULED, the live ones) can serve it
        return int(self._q(f"SELECT count(*) FROM {{s}}.tasks WHERE state='{TaskState(state).value}'").value())

    def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._q(_COUNTS_SQL).fetchall()}

    def ended(self, task_ids: list[str]) -> list[str]:
        """Which of these tasks have ended (one indexed look for many waits: a cluster's)."""
        rows = self._q(f"SELECT id FROM {{s}}.tasks WHERE id = ANY(%s) AND state IN {_TERMINAL_SQL}", (task_ids,))
        return [r[0] for r in rows.fetchall()]

    def exists(self, task_id: str) -> bool:
        return self._q("SELECT 1 FROM {s}.tasks WHERE id=%s", (task_id,)).fetchone() is not None

    def events_after(
        self, after: int, limit: int = 500, *, task_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        where, args = _events_where(after, task_id, session_id)
        rows = self._q(
            f"SELECT seq, task_id, session_id, kind, data, ts FROM {{s}}.events WHERE {where} ORDER BY seq LIMIT %s",
            (*args, limit),
        ).fetchall()
        return [_event(r) for r in rows]

    def retry_row(self, task_id: str) -> tuple[Any, ...] | None:
        row = self._q(
            "SELECT name, state, lock_key, session_id, session_owner, args, priority, rate_key, retried_as "
            "FROM {s}.tasks WHERE id=%s",
            (task_id,),
        ).fetchone()
        if row is None:
            return None
        return (*row[:5], bytes(row[5]) if row[5] is not None else None, *row[6:])

    def mark_retried(self, task_id: str, session_id: str | None, new_id: str) -> None:
        self._w("UPDATE {s}.tasks SET retried_as=%s WHERE id=%s", (new_id, task_id))
        self.add_event(task_id, session_id, "retried", {"retried_as": new_id})

    # ---- retention ---------------------------------------------------------------------------
    def prune_events(self, before: float, keep_max: int, batch: int) -> int:
        # the oldest ``batch`` by seq are the candidates; the first young one among them ends the run
        top = self._q("SELECT max(seq) FROM {s}.events").value()
        if top is None:
            return 0
        last = None
        for seq, ts in self._q("SELECT seq, ts FROM {s}.events ORDER BY seq LIMIT %s", (batch,)).fetchall():
            if ts >= before and seq > top - keep_max:
                break
            last = seq
        if last is None:
            return 0
        deleted = self._w("DELETE FROM {s}.events WHERE seq <= %s", (last,), wait=True)
        return deleted.rowcount if deleted is not None else 0

    def prune_finished(self, before: float, batch: int) -> dict[str, int]:
        rows = self._q(
            f"SELECT id, state FROM {{s}}.tasks WHERE finished_at < %s AND state IN {_TERMINAL_SQL} "
            "ORDER BY finished_at LIMIT %s",
            (before, batch),
        ).fetchall()
        pruned: dict[str, int] = {}
        if rows:
            ids = [r[0] for r in rows]
            self._w("DELETE FROM {s}.events WHERE task_id = ANY(%s)", (ids,))
            self._w("DELETE FROM {s}.cards WHERE task_id = ANY(%s)", (ids,))
            self._w("DELETE FROM {s}.tasks WHERE id = ANY(%s)", (ids,))
            for _, state in rows:
                pruned[state] = pruned.get(state, 0) + 1
        return pruned

    # ---- schedules ---------------------------------------------------------------------------
    def register_schedules(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        for name, cron, tz in specs:
            self._w(
                "INSERT INTO {s}.schedules(name, cron, tz, registered_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET cron=excluded.cron, tz=excluded.tz, "
                "registered_at=excluded.registered_at, last_slot=NULL "
                "WHERE schedules.cron != excluded.cron OR schedules.tz != excluded.tz",
                (name, cron, tz, now),
            )

    def schedule_marks(self) -> dict[str, dict[str, float | None]]:
        rows = self._q("SELECT name, registered_at, last_slot FROM {s}.schedules").fetchall()
        return {r[0]: {"registered_at": r[1], "last_slot": r[2]} for r in rows}

    def last_slot(self, name: str) -> float | None:
        row = self._q("SELECT last_slot FROM {s}.schedules WHERE name=%s", (name,)).fetchone()
        return row[0] if row else None

    def set_last_slot(self, name: str, slot: float) -> None:
        self.slot_pending = True
        self._w("UPDATE {s}.schedules SET last_slot=greatest(coalesce(last_slot, 0), %s) WHERE name=%s", (slot, name))

    # ---- session key-values ------------------------------------------------------------------
    def kv_get(self, session_id: str, key: str) -> str | None:
        row = self._q("SELECT value FROM {s}.session_kv WHERE session_id=%s AND key=%s", (session_id, key)).fetchone()
        return row[0] if row else None

    def kv_set(self, session_id: str, key: str, text: str) -> None:
        self._w(
            "INSERT INTO {s}.session_kv(session_id, key, value, updated_at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (session_id, key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (session_id, key, text, time.time()),
        )

    def kv_cas(self, session_id: str, key: str, expected: str | None, text: str) -> bool:
        """One statement, so that members of a cluster writing one key never lose an update."""
        if expected is None:
            sql = (
                "INSERT INTO {s}.session_kv(session_id, key, value, updated_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (session_id, key) DO NOTHING RETURNING 1"
            )
            params: tuple[Any, ...] = (session_id, key, text, time.time())
        else:
            sql = (
                "UPDATE {s}.session_kv SET value=%s, updated_at=%s WHERE session_id=%s AND key=%s AND value=%s "
                "RETURNING 1"
            )
            params = (text, time.time(), session_id, key, expected)
        rows = self._w(sql, params, wait=True)
        return rows is not None and rows.fetchone() is not None

    def kv_delete(self, session_id: str, key: str) -> bool:
        deleted = self._w("DELETE FROM {s}.session_kv WHERE session_id=%s AND key=%s", (session_id, key), wait=True)
        return deleted is not None and deleted.rowcount > 0

    def kv_items(self, session_id: str) -> list[tuple[str, str]]:
        rows = self._q(
            "SELECT key, value FROM {s}.session_kv WHERE session_id=%s ORDER BY key", (session_id,)
        ).fetchall()
        return [(k, v) for k, v in rows]


def _events_where(after: int, task_id: str | None, session_id: str | None) -> tuple[str, tuple[object, ...]]:
    if task_id is not None:
        return "task_id = %s AND seq > %s", (task_id, after)
    if session_id is not None:
        return "session_id = %s AND seq > %s", (session_id, after)
    return "seq > %s", (after,)


def _event(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"seq": int(r[0]), "task_id": r[1], "session_id": r[2], "kind": r[3], "data": json.loads(r[4]), "ts": r[5]}


# ---- reading from other processes ------------------------------------------------------------

_ORDER = {
    "QUEUED": "priority DESC, created_at ASC, id ASC",  # next to run first
    "SCHEDULED": "coalesce(run_at, created_at) ASC, id ASC",
    "RUNNING": "coalesce(started_at, created_at) DESC, id DESC",  # a workflow from its submit
    "SUCCEEDED": "finished_at DESC, id DESC",
    "FAILED": "finished_at DESC, id DESC",
    "CANCELLED": "finished_at DESC, id DESC",
}
_CARD_ROW = (
    "id, name, state, attempts, lock_key, session_id, created_at, started_at, finished_at, run_at, "
    "progress, error_type, error_message, slot"
)
_CARD_FIELDS = tuple(c.strip() for c in _CARD_ROW.split(","))
MAX_PAGE = 200
# The board's columns: a live flow record (waiting for its steps: SCHEDULED with no run_at) is in
# Running; its steps (flow_id set) are in no column.
_LIVE_RECORD = "(state = 'SCHEDULED' AND run_at IS NULL AND name = %s)"
_COLUMN = f"CASE WHEN {_LIVE_RECORD} THEN 'RUNNING' ELSE state END"
_IN_COLUMN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "QUEUED": ("state = 'QUEUED'", ()),
    "SCHEDULED": ("state = 'SCHEDULED' AND (run_at IS NOT NULL OR name <> %s)", (FLOW_RECORD,)),
    "RUNNING": (f"(state = 'RUNNING' OR {_LIVE_RECORD})", (FLOW_RECORD,)),
    **{state: ("state = %s", (state,)) for state in ("SUCCEEDED", "FAILED", "CANCELLED")},
}
# A page's workflow cards: their steps per state and running steps (the index tasks_flow), and how
# each one's value is made (its first `flow` event: ``flow_kind``).
_FLOW_STATES = "SELECT flow_id, state, count(*) FROM {s}.tasks WHERE flow_id = ANY(%s) GROUP BY flow_id, state"
_FLOW_RUNNING = (
    "SELECT flow_id, id, name FROM {s}.tasks WHERE flow_id = ANY(%s) AND state = 'RUNNING' ORDER BY started_at, id"
)
_FLOW_SHAPES = (
    "SELECT f.id, jsonb_typeof(e.d -> 'value'), jsonb_typeof(e.d -> 'inputs' -> (e.d ->> 'value')) "
    "FROM unnest(%s::text[]) AS f(id) CROSS JOIN LATERAL (SELECT data::jsonb AS d FROM {s}.events "
    "WHERE task_id = f.id AND kind = 'flow' ORDER BY seq LIMIT 1) AS e"
)


def _card_row(row: tuple[Any, ...], fields: tuple[str, ...] = _CARD_FIELDS) -> dict[str, Any]:
    d = dict(zip(fields, row))
    etype, emsg = d.pop("error_type"), d.pop("error_message")
    d["error"] = f"{etype}: {emsg or ''}" if etype else None
    return d


# ---- the board's Stats view (StoreReader.stats_rows): grouped here, assembled in ui/stats.py ----
_ARRIVAL = "coalesce(run_at, created_at)"
_DEPARTURE = "coalesce(started_at, finished_at)"
_STATS_SQL = {
    "finished": "SELECT floor((finished_at - %(since)s) / %(step)s)::int AS b, state, count(*) FROM {s}.tasks "
    "WHERE finished_at >= %(since)s GROUP BY b, state",
    "arrivals": f"SELECT floor(({_ARRIVAL} - %(since)s) / %(step)s)::int AS b, name, count(*) FROM {{s}}.tasks "
    f"WHERE {_ARRIVAL} >= %(since)s AND {_ARRIVAL} <= %(now)s GROUP BY b, name",
    "departures": f"SELECT floor(({_DEPARTURE} - %(since)s) / %(step)s)::int AS b, name, count(*) "
    f"FROM {{s}}.tasks WHERE {_DEPARTURE} >= %(since)s GROUP BY b, name",
    "queued_before": f"SELECT name, count(*) FROM {{s}}.tasks WHERE {_ARRIVAL} < %(since)s "
    f"AND ({_DEPARTURE} IS NULL OR {_DEPARTURE} >= %(since)s) GROUP BY name",
    "run_times": "SELECT name, finished_at - started_at FROM {s}.tasks WHERE finished_at >= %(since)s "
    "AND started_at IS NOT NULL AND state IN ('SUCCEEDED', 'FAILED') ORDER BY finished_at DESC LIMIT %(limit)s",
    "crashes": "SELECT floor((ts - %(since)s) / %(step)s)::int AS b, count(*) FROM {s}.events "
    "WHERE ts >= %(since)s AND kind = 'state' AND data LIKE %(crashed)s GROUP BY b",
    "restarts": "SELECT floor((ts - %(since)s) / %(step)s)::int AS b, count(*) FROM {s}.events "
    "WHERE ts >= %(since)s AND kind = %(actor_exit)s GROUP BY b",
}


class PostgresReader(StoreReader):
    """Read-only connections (one per thread) to the app's schema; a lost server is a
    ``StoreUnavailable`` for the read that met it, and the next read connects again."""

    def __init__(self, url: str, app_name: str) -> None:
        self._url = url
        self._app_name = app_name
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        _, self.schema = split_url(url, app_name)

    def _db(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:  # a lost server: connect again
            try:
                conn, _ = _connect(self._url, self._app_name, autocommit=True)
            except StateDirError as exc:
                raise StoreUnavailable(str(exc)) from None
            self._check_schema(conn)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _check_schema(self, conn: Any) -> None:
        try:
            row = conn.execute(f"SELECT value FROM {self.schema}.meta WHERE key='schema_version'").fetchone()
        except _psycopg().errors.UndefinedTable:  # no store yet (its supervisor has not started)
            return
        if row is not None:
            try:
                check_schema(int(row[0]), SCHEMA_VERSION, f"the PostgreSQL store {redact(self._url)} ({self.schema})")
            except StateDirError:
                conn.close()
                raise

    def _q(self, sql: str, params: Any = None) -> Any:
        db = self._db()
        try:
            return db.execute(sql.replace("{s}", self.schema), params)
        except Exception as exc:
            if db.broken:  # the next read connects again; this one says why it failed
                raise StoreUnavailable(f"lost the PostgreSQL store {redact(self._url)}: {exc}") from None
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        db = self._db()
        if getattr(self._local, "in_snapshot", False):
            yield
            return
        self._local.in_snapshot = True
        try:
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield
        finally:
            self._local.in_snapshot = False

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def info(self, task_id: str) -> dict[str, Any] | None:
        row = self._q(_INFO_SQL, (task_id,)).fetchone()
        return _info(row) if row else None

    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        return [_info(r) for r in self._q(*_list_sql(state, limit)).fetchall()]

    def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._q(_COUNTS_SQL).fetchall()}

    def find_ids(self, ending: str, limit: int) -> list[str]:
        return [r[0] for r in self._q(_FIND_IDS_SQL, (len(ending), ending, limit)).fetchall()]

    def last_seq(self) -> int:
        row = self._q("SELECT max(seq) FROM {s}.events").fetchone()
        return int(row[0] or 0)

    def stats_rows(self, since: float, step: float, limit: int) -> StatsRows:
        params: dict[str, object] = {"since": since, "step": step, "now": time.time(), "limit": limit}
        params.update(crashed=CRASHED_PATTERN, actor_exit=ACTOR_EXIT)
        with self.snapshot():
            rows = {key: [tuple(r) for r in self._q(sql, params).fetchall()] for key, sql in _STATS_SQL.items()}
        return StatsRows(**rows)

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
        where, params = [], []
        task_id = task_id and task_id.strip().lower()
        for column, value in (("name", name), ("session_id", session), ("lock_key", lock), ("id", task_id)):
            if value:
                where.append(f"strpos({column}, %s) > 0")
                params.append(value)
        filters = " AND ".join(where) or "true"
        if params:  # a row that matches, or a workflow one of whose steps matches
            filters = (
                f"({filters} OR (flow_id IS NULL AND id IN "
                f"(SELECT flow_id FROM {{s}}.tasks WHERE flow_id IS NOT NULL AND {filters})))"
            )
            params = [*params, *params]
        offsets = offsets or {}
        page_size = max(1, min(MAX_PAGE, page_size))
        with self.snapshot():
            counts: dict[str, int] = {}
            steps: dict[str, int] = {}
            for column, is_step, n in self._q(  # one scan: cards per column, steps per state
                f"SELECT {_COLUMN} AS col, flow_id IS NOT NULL AS step, count(*) FROM {{s}}.tasks "
                f"WHERE {filters} GROUP BY col, step",
                [FLOW_RECORD, *params],
            ).fetchall():
                (steps if is_step else counts)[column] = int(n)
            columns, cards = [], []
            for state in TaskState:
                count = counts.get(state.value, 0)
                offset = max(0, min(int(offsets.get(state.value, 0)), max(0, count - 1)))
                offset -= offset % page_size
                in_column, column_params = _IN_COLUMN[state.value]
                rows = self._q(
                    f"SELECT {_CARD_ROW} FROM {{s}}.tasks WHERE {in_column} AND flow_id IS NULL AND {filters} "
                    f"ORDER BY {_ORDER[state.value]} LIMIT %s OFFSET %s",
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
            flow_ids = [c["id"] for c in cards if c["name"] == FLOW_RECORD]
            if flow_ids:
                board_flows(
                    cards,
                    self._q(_FLOW_STATES, (flow_ids,)).fetchall(),
                    self._q(_FLOW_RUNNING, (flow_ids,)).fetchall(),
                    self._q(_FLOW_SHAPES, (flow_ids,)).fetchall(),
                )
            out: dict[str, Any] = {
                "columns": columns,
                "seq": self.last_seq(),
                "page_size": page_size,
                "total": sum(counts.values()),
            }
            if names:
                out["names"] = [
                    r[0] for r in self._q("SELECT DISTINCT name FROM {s}.tasks ORDER BY name LIMIT 500").fetchall()
                ]
        return out

    def task_detail(self, task_id: str, max_events: int = 200) -> dict[str, Any] | None:
        fields = (*_CARD_FIELDS, "flow_id", "session_owner", "traceback", "args_bytes", "result_bytes")
        with self.snapshot():
            row = self._q(
                f"SELECT {_CARD_ROW}, flow_id, session_owner, traceback, octet_length(args), octet_length(result) "
                "FROM {s}.tasks WHERE id=%s",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            out = _card_row(row, fields)
            events = self._q(
                "SELECT seq, kind, data, ts, session_id FROM {s}.events WHERE task_id=%s ORDER BY seq DESC LIMIT %s",
                (task_id, max_events),
            ).fetchall()
            n_events = int(self._q("SELECT count(*) FROM {s}.events WHERE task_id=%s", (task_id,)).fetchone()[0])
        out["events"] = [
            {"seq": int(e[0]), "kind": e[1], "data": _json(e[2]), "ts": e[3], "session_id": e[4]}
            for e in reversed(events)
        ]
        out["events_total"] = n_events
        return out

    def flow_steps(self, flow_id: str) -> dict[str, Any] | None:
        with self.snapshot():
            row = self._q(
                "SELECT data FROM {s}.events WHERE task_id=%s AND kind='flow' ORDER BY seq LIMIT 1", (flow_id,)
            ).fetchone()
            if row is not None:
                record = _json(row[0])
            else:  # its event was pruned (retention): the steps that name it, in submit order
                steps = self._q("SELECT id FROM {s}.tasks WHERE flow_id=%s ORDER BY seq", (flow_id,)).fetchall()
                if not steps:
                    return None
                record = {"steps": [r[0] for r in steps], "inputs": {}, "on_error": None, "value": None}
            ids = flow_members(record)
            rows = self._q(
                "SELECT id, name, state, attempts, error_type, error_message FROM {s}.tasks WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        found = {r[0]: _step_row(r) for r in rows}
        return {**record, "step_rows": [found[i] for i in ids if i in found]}

    def due_scheduled(self, now: float, limit: int) -> list[str]:
        rows = self._q(
            "SELECT id FROM {s}.tasks WHERE state='SCHEDULED' AND run_at <= %s ORDER BY run_at LIMIT %s", (now, limit)
        ).fetchall()
        return [r[0] for r in rows]

    def next_scheduled_after(self, now: float) -> float | None:
        row = self._q("SELECT min(run_at) FROM {s}.tasks WHERE state='SCHEDULED' AND run_at > %s", (now,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _step_row(r: Any) -> dict[str, Any]:
    """One workflow step as the board shows it."""
    error = f"{r[4]}: {r[5]}" if r[4] else None
    return {"id": r[0], "name": r[1], "state": r[2], "attempts": int(r[3]), "error": error}
