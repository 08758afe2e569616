"""The store side of the store-only client (``capsule_actors/store_client.py``): app code on a
host where no supervisor runs writes its submits straight into a cluster's PostgreSQL schema.

``PoolWriter`` is a ``PostgresStore`` (so the same schema, created or checked as it opens, the
same inserts, a lost server ridden out for the outage with every write of the open transaction
kept until it commits) whose tasks go to the pool: ``tasks.owner`` 0 and no origin, so any
member may claim them and, since none took them in, tells their end with a ``done`` note. It is
no member: nothing it writes is fenced, and it keeps nothing in memory per task. Its wake-ups
(``NOTIFY``) go at its commit, as a member's do.

The statements here are the few only such a client needs; the admissions and cancels it asks
are ``ClusterTable``'s (``store/cluster.py``), with the client's own negative origin.
"""

from __future__ import annotations

import json
import time

from ..errors import StoreUnavailable
from .base import FLOW_RECORD, NewTask
from .cluster import POOL, ClusterTable, shard_of
from .postgres import PostgresStore

_LIVE = "('QUEUED','SCHEDULED','RUNNING')"
CANCELLED_BY_REQUEST = ("TaskCancelled", "cancelled by request")  # as a supervisor records a cancel


class PoolWriter(PostgresStore):
    """One store-only client's connection: submits into the pool, and what it reads and asks."""

    def _placed(self) -> tuple[int, int | None] | None:
        return POOL, None

    def _keep_args(self, task_id: str, args: bytes) -> None:
        """Nothing kept: no start follows here."""

    def _noted(self, task_id: str, session_id: str | None, kind: str = "") -> None:
        """Nobody to wake here (members find events in the store)."""

    def commit(self) -> None:
        if self._dirty:
            self._send_notes()  # a member sends them only after its fence: we have none
        super().commit()

    def _unavailable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the PostgreSQL store {self.url} could not be reached for {self.outage:g} s ({why}); what this "
            "process submitted before is recorded (a submit returns once committed), the request that met "
            "the outage was not"
        )

    # ---- submits -------------------------------------------------------------------------------
    def submit(self, rows: list[NewTask], locked: list[NewTask], table: ClusterTable) -> None:
        """Unlocked tasks into the pool, each with its state event; each locked one asked of the
        holder of its key's shard. The caller commits: all of it, or (``abort``) none."""
        if rows:
            self.insert_tasks(rows)
            self.notes.add("pool")  # members with room claim queued ones; the clock's member looks again
        for row in locked:
            assert row.lock_key is not None
            table.ask(row, shard_of(row.lock_key))

    def withdraw(self, task_ids: list[str], origin: int) -> list[str]:
        """Take back asked admissions that no member has begun to decide (none is live)."""
        rows = self._w(
            "DELETE FROM {s}.admissions WHERE task_id = ANY(%s) AND origin=%s AND taker IS NULL "
            "AND verdict IS NULL RETURNING task_id",
            (task_ids, origin),
            wait=True,
        )
        return [r[0] for r in rows.fetchall()] if rows is not None else []

    # ---- cancels -------------------------------------------------------------------------------
    def cancel_pooled(self, task_id: str) -> bool:
        """End a task still in the pool (no member holds it) as CANCELLED, its state event with it,
        in one statement, and tell the members (``done``: one may wait for it); False when it is
        not there (a member holds it, it ended, or it belongs to a workflow, whose holder must
        hear of its end)."""
        etype, emsg = CANCELLED_BY_REQUEST
        now = time.time()
        data = json.dumps({"state": "CANCELLED", "error": f"{etype}: {emsg}"})
        rows = self._w(
            "WITH u AS (UPDATE {s}.tasks SET state='CANCELLED', error_type=%s, error_message=%s, traceback='', "
            f"finished_at=%s, run_at=NULL WHERE id=%s AND owner=%s AND state IN {_LIVE} AND flow_id IS NULL "
            "AND name <> %s RETURNING id, session_id), "
            "ev AS (INSERT INTO {s}.events(task_id, session_id, kind, data, ts) "
            "SELECT id, session_id, 'state', %s, %s FROM u) SELECT id FROM u",
            (etype, emsg, now, task_id, POOL, FLOW_RECORD, data, now),
            wait=True,
        )
        if rows is None or rows.fetchone() is None:
            return False
        self._done.append(task_id)
        return True

    def holder(self, task_id: str) -> tuple[str, int | None] | None:
        """A task's state and owner (the member holding it, 0 the pool, None no cluster's)."""
        row = self._q("SELECT state, owner FROM {s}.tasks WHERE id=%s", (task_id,)).fetchone()
        return None if row is None else (str(row[0]), None if row[1] is None else int(row[1]))

    # ---- reading -------------------------------------------------------------------------------
    def live_members(self) -> int:
        """Members whose lease runs now (the server's clock)."""
        return int(
            self._q("SELECT count(*) FROM {s}.members WHERE state='live' AND expires > clock_timestamp()").value()
        )
