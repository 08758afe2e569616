"""The cluster's tables on PostgreSQL: members and their leases, shards, admissions, the pool.

Several supervisors (members) share one PostgreSQL schema. What each statement here guarantees:

- ``members``: one row per incarnation; ``id`` (a sequence) is the incarnation's epoch. A member
  renews its ``expires`` (the server's clock: ``clock_timestamp()``, so no two hosts' clocks are
  compared) every quarter of its lease. Another member marks it ``lost`` once ``expires`` is past,
  locking the row ``FOR UPDATE SKIP LOCKED`` so that it never waits for the member it takes over.
- Fencing: every write transaction of a member begins with ``fence(id)`` (``FENCE_FUNCTION``),
  which locks its own row ``FOR SHARE`` or raises ``REFUSED``, aborting the transaction. A
  takeover's ``FOR UPDATE`` skips the row while a transaction of the member is open; a member's
  transaction that begins after the takeover waits for it, then finds its row ``lost`` and is
  refused (``PostgresStore`` rolls back and raises ``Fenced``). So a member's writes either commit
  before the takeover (which then sees them) or not at all; and the fence is pipelined with the
  writes, so it costs the member no round trip of its own.
- ``shards``: lock keys map to ``SHARDS`` shards (``shard_of``); each row has one owner (a member
  id) or none, and an ``epoch`` raised at each change of hands. Shard -1 is the clock. A member
  claims free rows ``FOR UPDATE SKIP LOCKED`` and gives back only shards it has nothing live on,
  so no shard ever has two owners.
- ``tasks.owner``: the member holding a live task; 0 is the pool (claimable by any member), NULL
  a store used by one supervisor (no cluster). ``tasks.origin`` is the member it was submitted
  to (told when the task ends elsewhere); ``tasks.shard`` the shard of its lock key.
- ``admissions``: a locked submit whose shard another member holds waits here for that member's
  decision (run, queue, join, reject), which the submitting member reads back to answer its client
  (kind ``step``: a released workflow step, whose waiting row the holder takes). ``cancels``: a
  cancel of a task another member holds, answered by it. In both, a negative origin is a
  store-only client (``store_client.py``), never a member.

Wake-ups go by ``NOTIFY`` on one channel per schema (``pool``, ``admit``, ``verdict ORIGIN``,
``cancel``, ``cancelled ORIGIN``, ``done IDS``, ``ev``, ``member``); every member also looks at
each renewal, so a lost notification costs a delay only.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ..errors import AlreadyRunning, Fenced
from .base import NewTask, StoredTask

if TYPE_CHECKING:
    from .postgres import PostgresStore

SHARDS = 64  # lock keys map to this many shards; fixed for a schema (part of the key -> owner map)
CLOCK = -1  # the shards row that is the clock's lease
POOL = 0  # tasks.owner of a task any member may claim

SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.members (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    state_dir text NOT NULL,
    state text NOT NULL,
    lease double precision NOT NULL,
    joined double precision NOT NULL,
    renewed double precision NOT NULL,
    expires timestamptz NOT NULL,
    ended double precision
);
CREATE UNIQUE INDEX IF NOT EXISTS members_live ON {s}.members(name) WHERE state = 'live';
CREATE TABLE IF NOT EXISTS {s}.shards (
    shard integer PRIMARY KEY,
    owner bigint,
    epoch bigint NOT NULL DEFAULT 0
);
INSERT INTO {s}.shards(shard) SELECT generate_series(-1, 63) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}.admissions (
    seq bigserial PRIMARY KEY,
    task_id text NOT NULL UNIQUE,
    origin bigint NOT NULL,
    shard integer NOT NULL,
    item bytea NOT NULL,
    kind text NOT NULL DEFAULT 'submit',
    taker bigint,
    verdict text,
    holder text
);
CREATE TABLE IF NOT EXISTS {s}.cancels (
    task_id text NOT NULL,
    origin bigint NOT NULL,
    answer boolean,
    PRIMARY KEY (task_id, origin)
);
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS owner bigint;
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS origin bigint;
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS shard integer;
CREATE INDEX IF NOT EXISTS tasks_owned ON {s}.tasks(owner, seq)
    WHERE owner IS NOT NULL AND state IN ('QUEUED', 'SCHEDULED', 'RUNNING');
"""

# The fence, the first statement of a member's every write transaction: its own row locked FOR
# SHARE (a takeover holding it FOR UPDATE makes this wait, then see the row lost), or REFUSED
# raised, which aborts the transaction, so its COMMIT writes nothing (no round trip of its own).
REFUSED = "CF001"
FENCE_FUNCTION = """
CREATE OR REPLACE FUNCTION {s}.fence(member bigint) RETURNS void LANGUAGE plpgsql AS $fence$
BEGIN
    PERFORM 1 FROM {s}.members WHERE id = member AND state = 'live' FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CF001', MESSAGE = format('cluster member %s was taken over', member);
    END IF;
END
$fence$
"""

_LIVE = "('QUEUED','SCHEDULED','RUNNING')"
_STORED = "seq, id, name, state, lock_key, session_id, session_owner, attempts, run_at, slot, priority, rate_key"


def shard_of(key: str) -> int:
    """The shard of a lock key: the same on every member and every version."""
    return zlib.crc32(key.encode()) % SHARDS


@dataclass(frozen=True)
class MemberRow:
    id: int
    name: str
    host: str
    pid: int
    state_dir: str


@dataclass(frozen=True)
class Asked:
    """An admission another member asked this one (the holder of its shard) to decide."""

    task_id: str
    origin: int
    row: NewTask
    kind: str = "submit"  # or "step": a released workflow step, recorded already (waiting)


def pack_task(row: NewTask) -> bytes:
    return bytes(msgpack.packb(list(row), use_bin_type=True))


def unpack_task(data: bytes) -> NewTask:
    return NewTask(*msgpack.unpackb(data, raw=False))


class ClusterTable:
    """The cluster's statements, on the supervisor's store connection (its transaction, its redo)."""

    def __init__(self, store: PostgresStore) -> None:
        self._db = store
        self.channel = store.schema  # LISTEN/NOTIFY channel: the schema's name
        self.me: int | None = None

    # ---- joining and leaving -----------------------------------------------------------------
    def join(self, name: str, state_dir: str, lease: float) -> tuple[int, list[MemberRow]]:
        """A new incarnation of ``name``; returns its id and the rows of earlier incarnations of
        this very member (same host and state directory, so dead: we hold its pid lock) still
        marked live, for the caller to take over. A live member of that name elsewhere is refused."""
        db, host, now = self._db, socket.gethostname(), time.time()
        rows = db._q(
            "SELECT id, name, host, pid, state_dir FROM {s}.members WHERE name=%s AND state='live' FOR UPDATE", (name,)
        ).fetchall()
        mine = [MemberRow(*r) for r in rows]
        for row in mine:
            if (row.host, row.state_dir) != (host, state_dir):
                raise AlreadyRunning(
                    f"a cluster member named {name!r} is live on host {row.host} (pid {row.pid}, state dir "
                    f"{row.state_dir}); give this one another --name, or stop that one first"
                )
            db._w("UPDATE {s}.members SET state='lost', ended=%s WHERE id=%s", (now, row.id))
        new = db._w(
            "INSERT INTO {s}.members(name, host, pid, state_dir, state, lease, joined, renewed, expires) "
            "VALUES (%s, %s, %s, %s, 'live', %s, %s, %s, clock_timestamp() + make_interval(secs => %s)) RETURNING id",
            (name, host, os.getpid(), state_dir, lease, now, now, lease),
            wait=True,
        )
        assert new is not None
        self.me = int(new.value())
        self.notify("member")
        return self.me, mine

    def renew(self, lease: float) -> None:
        """Push this member's expiry one lease ahead, or raise Fenced when it was taken over."""
        done = self._db._w(
            "UPDATE {s}.members SET expires = clock_timestamp() + make_interval(secs => %s), renewed=%s "
            "WHERE id=%s AND state='live' RETURNING 1",
            (lease, time.time(), self.me),
            wait=True,
        )
        if done is None or done.fetchone() is None:
            raise Fenced(f"cluster member {self.me} was taken over by another member (its lease ran out)")

    def leave(self) -> None:
        """A graceful stop: everything live of ours to the pool, our shards and the clock free."""
        db = self._db
        db._w("UPDATE {s}.tasks SET owner=%s WHERE owner=%s AND state IN " + _LIVE, (POOL, self.me))
        db._w("UPDATE {s}.shards SET owner=NULL, epoch=epoch+1 WHERE owner=%s", (self.me,))
        db._w("UPDATE {s}.admissions SET taker=NULL WHERE taker=%s AND verdict IS NULL", (self.me,))
        db._w("DELETE FROM {s}.admissions WHERE origin=%s", (self.me,))
        db._w("DELETE FROM {s}.cancels WHERE origin=%s", (self.me,))
        db._w("UPDATE {s}.members SET state='left', ended=%s WHERE id=%s", (time.time(), self.me))
        self.notify("member")
        self.notify("pool")
        self.notify("admit")

    # ---- lost members ------------------------------------------------------------------------
    def expired(self) -> list[MemberRow]:
        """Mark the members whose lease is past as lost (skipping any whose transaction is open)."""
        rows = self._db._w(
            "UPDATE {s}.members SET state='lost', ended=%s WHERE id IN (SELECT id FROM {s}.members "
            "WHERE state='live' AND expires < clock_timestamp() AND id <> %s FOR UPDATE SKIP LOCKED) "
            "RETURNING id, name, host, pid, state_dir",
            (time.time(), self.me),
            wait=True,
        )
        return [MemberRow(*r) for r in rows.fetchall()] if rows is not None else []

    def running_of(self, member: int) -> list[StoredTask]:
        rows = self._db._q(
            f"SELECT {_STORED} FROM {{s}}.tasks WHERE owner=%s AND state='RUNNING' ORDER BY seq", (member,)
        ).fetchall()
        return [StoredTask(*r) for r in rows]

    def release_member(self, member: int) -> None:
        """A lost member's live tasks go to the pool, its shards and clock are free, admissions
        it took are open again."""
        db = self._db
        db._w("UPDATE {s}.tasks SET owner=%s WHERE owner=%s AND state IN " + _LIVE, (POOL, member))
        db._w("UPDATE {s}.shards SET owner=NULL, epoch=epoch+1 WHERE owner=%s", (member,))
        db._w("UPDATE {s}.admissions SET taker=NULL WHERE taker=%s AND verdict IS NULL", (member,))
        db._w(  # (a negative origin is a store-only client's: it reads its verdicts itself)
            "DELETE FROM {s}.admissions a WHERE verdict IS NOT NULL AND a.origin > 0 AND NOT EXISTS "
            "(SELECT 1 FROM {s}.members m WHERE m.id = a.origin AND m.state = 'live')"
        )
        db._w("DELETE FROM {s}.cancels WHERE origin=%s", (member,))
        self.notify("pool")
        self.notify("admit")

    # ---- shards ------------------------------------------------------------------------------
    def live_count(self) -> int:
        return int(self._db._q("SELECT count(*) FROM {s}.members WHERE state='live'").value())

    def claim_shards(self, wanted: int) -> list[int]:
        """Up to ``wanted`` free shards (not the clock), now ours."""
        if wanted <= 0:
            return []
        rows = self._db._w(
            "UPDATE {s}.shards SET owner=%s, epoch=epoch+1 WHERE shard IN (SELECT shard FROM {s}.shards "
            "WHERE owner IS NULL AND shard >= 0 ORDER BY shard LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING shard",
            (self.me, wanted),
            wait=True,
        )
        return sorted(int(r[0]) for r in rows.fetchall()) if rows is not None else []

    def give_shards(self, shards: list[int]) -> None:
        if shards:
            self._db._w(
                "UPDATE {s}.shards SET owner=NULL, epoch=epoch+1 WHERE owner=%s AND shard = ANY(%s)", (self.me, shards)
            )
            self.notify("member")

    def claim_clock(self) -> bool:
        rows = self._db._w(
            "UPDATE {s}.shards SET owner=%s, epoch=epoch+1 WHERE shard=%s AND owner IS NULL RETURNING 1",
            (self.me, CLOCK),
            wait=True,
        )
        return rows is not None and rows.fetchone() is not None

    def shard_tasks(self, shards: list[int]) -> list[StoredTask]:
        """The live tasks of shards just claimed (left in the pool by their last holder), now ours."""
        rows = self._db._w(
            f"UPDATE {{s}}.tasks SET owner=%s WHERE owner=%s AND shard = ANY(%s) AND state IN {_LIVE} "
            f"RETURNING {_STORED}, origin",
            (self.me, POOL, shards),
            wait=True,
        )
        return self._claimed(rows)

    def claim_waiting_steps(self) -> int:
        """Workflow records and steps waiting for inputs that a lost or leaving member left in the
        pool: ours now (they are released where their inputs' ends are heard)."""
        rows = self._db._w(
            "UPDATE {s}.tasks SET owner=%s WHERE owner=%s AND state='SCHEDULED' AND run_at IS NULL RETURNING 1",
            (self.me, POOL),
            wait=True,
        )
        return len(rows.fetchall()) if rows is not None else 0

    # ---- the pool ----------------------------------------------------------------------------
    def claim_queued(self, limit: int, now: float) -> list[StoredTask]:
        """Up to ``limit`` unlocked QUEUED pool tasks that may start now, highest priority first,
        then in submit order; ours from now on."""
        rows = self._db._w(
            f"UPDATE {{s}}.tasks SET owner=%s WHERE id IN (SELECT id FROM {{s}}.tasks WHERE owner=%s AND "
            "state='QUEUED' AND lock_key IS NULL AND (run_at IS NULL OR run_at <= %s) "
            f"ORDER BY priority DESC, seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_STORED}, origin",
            (self.me, POOL, now, limit),
            wait=True,
        )
        return sorted(self._claimed(rows), key=lambda t: (-t.priority, t.rowid))

    def claim_one(self, task_id: str) -> StoredTask | None:
        """One unlocked task held in the store only -- ours (a released workflow step) or the
        pool's, if nobody took it (a delayed one come due, or one being cancelled) -- now ours."""
        rows = self._db._w(
            "UPDATE {s}.tasks SET owner=%s WHERE id=%s AND owner IN (%s, %s) AND state IN ('QUEUED','SCHEDULED') "
            f"AND lock_key IS NULL RETURNING {_STORED}, origin",
            (self.me, task_id, POOL, self.me),
            wait=True,
        )
        claimed = self._claimed(rows)
        return claimed[0] if claimed else None

    def _claimed(self, rows: Any) -> list[StoredTask]:
        """Rows claimed, as stored tasks; those submitted to another member are told at their end."""
        out = []
        for r in rows.fetchall() if rows is not None else []:
            if r[-1] != self.me:
                self._db.notify_done.add(r[1])
            out.append(StoredTask(*r[:-1]))
        return sorted(out, key=lambda t: t.rowid)

    # ---- admissions --------------------------------------------------------------------------
    def ask(self, row: NewTask, shard: int, kind: str = "submit") -> None:
        """Ask the holder of ``shard`` to admit ``row`` (answered through ``verdicts``)."""
        self._db._w(
            "INSERT INTO {s}.admissions(task_id, origin, shard, item, kind) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (task_id) DO NOTHING",
            (row.id, self.me, shard, pack_task(row), kind),
        )
        self.notify("admit")

    def take_asked(self, shards: list[int], limit: int = 500) -> list[Asked]:
        """Admissions for our shards that nobody is deciding: ours to decide now."""
        if not shards:
            return []
        rows = self._db._w(
            "UPDATE {s}.admissions SET taker=%s WHERE seq IN (SELECT seq FROM {s}.admissions WHERE taker IS NULL "
            "AND verdict IS NULL AND shard = ANY(%s) ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) "
            "RETURNING seq, task_id, origin, item, kind",
            (self.me, shards, limit),
            wait=True,
        )
        found = sorted(rows.fetchall(), key=lambda r: r[0]) if rows is not None else []
        return [Asked(r[1], int(r[2]), unpack_task(bytes(r[3])), r[4]) for r in found]

    def claim_step(self, task_id: str) -> bool:
        """A workflow step admitted here: ours, unless it ended meanwhile (its workflow cancelled)."""
        rows = self._db._w(
            "UPDATE {s}.tasks SET owner=%s WHERE id=%s AND state='SCHEDULED' RETURNING origin",
            (self.me, task_id),
            wait=True,
        )
        row = rows.fetchone() if rows is not None else None
        if row is not None and row[0] != self.me:
            self._db.notify_done.add(task_id)
        return row is not None

    def answer(self, task_id: str, origin: int, verdict: str, holder: str | None) -> None:
        self._db._w("UPDATE {s}.admissions SET verdict=%s, holder=%s WHERE task_id=%s", (verdict, holder, task_id))
        self.notify(f"verdict {origin}")

    def verdicts(self) -> list[tuple[str, str, str | None]]:
        """The decisions on what we asked: (task id, verdict, holder), each read once."""
        rows = self._db._w(
            "DELETE FROM {s}.admissions WHERE origin=%s AND verdict IS NOT NULL RETURNING task_id, verdict, holder",
            (self.me,),
            wait=True,
        )
        return [(r[0], r[1], r[2]) for r in rows.fetchall()] if rows is not None else []

    # ---- cancels -----------------------------------------------------------------------------
    def ask_cancel(self, task_id: str) -> None:
        self._db._w(
            "INSERT INTO {s}.cancels(task_id, origin) VALUES (%s, %s) ON CONFLICT DO NOTHING", (task_id, self.me)
        )
        self.notify("cancel")

    def cancels_for_us(self) -> list[tuple[str, int]]:
        rows = self._db._q(
            "SELECT c.task_id, c.origin FROM {s}.cancels c JOIN {s}.tasks t ON t.id = c.task_id "
            "WHERE c.answer IS NULL AND t.owner = %s",
            (self.me,),
        ).fetchall()
        return [(r[0], int(r[1])) for r in rows]

    def answer_cancel(self, task_id: str, origin: int, cancelled: bool) -> None:
        self._db._w("UPDATE {s}.cancels SET answer=%s WHERE task_id=%s AND origin=%s", (cancelled, task_id, origin))
        self.notify(f"cancelled {origin}")

    def cancel_answers(self) -> list[tuple[str, bool]]:
        rows = self._db._w(
            "DELETE FROM {s}.cancels WHERE origin=%s AND answer IS NOT NULL RETURNING task_id, answer",
            (self.me,),
            wait=True,
        )
        return [(r[0], bool(r[1])) for r in rows.fetchall()] if rows is not None else []

    def drop_cancel(self, task_id: str) -> None:
        self._db._w("DELETE FROM {s}.cancels WHERE task_id=%s AND origin=%s", (task_id, self.me))

    # ---- reading -----------------------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        """Every member row, newest first, with what each holds (for status)."""
        rows = self._db._q(
            "SELECT m.id, m.name, m.host, m.pid, m.state, m.joined, m.renewed, m.lease, m.state_dir, "
            "(SELECT count(*) FROM {s}.shards s WHERE s.owner = m.id AND s.shard >= 0), "
            "EXISTS (SELECT 1 FROM {s}.shards s WHERE s.owner = m.id AND s.shard = -1), "
            "(SELECT count(*) FROM {s}.tasks t WHERE t.owner = m.id AND t.state IN " + _LIVE + ") "
            "FROM {s}.members m ORDER BY m.id DESC LIMIT 100"
        ).fetchall()
        keys = ("id", "name", "host", "pid", "state", "joined", "renewed", "lease", "state_dir", "shards", "clock")
        return [{**dict(zip(keys, r[:11])), "live_tasks": int(r[11])} for r in rows]

    def pool_size(self) -> int:
        return int(self._db._q("SELECT count(*) FROM {s}.tasks WHERE owner=0 AND state IN " + _LIVE).value())

    def notify(self, payload: str) -> None:
        """Sent at commit (NOTIFY is transactional), to every member listening, this one included."""
        self._db.notes.add(payload)
