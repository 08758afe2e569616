"""One member of a cluster of supervisors on one PostgreSQL schema (``run --name NAME``).

``Membership`` owns this member's incarnation (its id, the epoch that fences its writes), its
lease, the shards and the clock it holds, the submits waiting for another member's admission,
and the LISTEN connection that wakes it. The statements are ``store/cluster.py``'s.

The lease, in time: every quarter lease the member renews its row (the server's clock sets
``expires`` a lease ahead) and commits; from the moment before that statement, its own loop and
its actor template count three quarters of a lease (``deadline``, monotonic). Past it the loop
raises ``Fenced`` and the template SIGKILLs every actor, so both have stopped before any other
member can see the row expired and take over. A member that was frozen or cut off and comes back
finds its row lost at its next write (the fence, ``PostgresStore``) and rejoins as a new incarnation.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from ..errors import Fenced
from ..states import LIVE, QUEUED, SUCCEEDED
from ..store import NewTask
from ..store.cluster import SHARDS, Asked, ClusterTable, MemberRow, shard_of
from .flows import Admission, FlowSteps

if TYPE_CHECKING:
    from ..store import StoredTask
    from ..store.postgres import PostgresStore
    from .attempts import Attempts
    from .children import Children
    from .intake import Intake
    from .keys import KeyRouting
    from .outbox import Outbox
    from .tasks import TaskTable
    from .timers import Timers
    from .waiters import Waiters

log = logging.getLogger("capsule_actors.supervisor")

LEASE = 6.0  # seconds a member's lease lasts (renewed every quarter of it)
MARGIN = 0.25  # the share of a lease before its end at which this member stops by itself
CLUSTER_WINDOW = 100  # queued unlocked tasks of one priority a member keeps; more go to the pool
FALLBACK_LOOKS = 500  # watched workflow inputs looked up in the store per renewal (lost notifications)


class Membership:
    """This member: its lease and incarnation, its shards and the clock, remote admissions."""

    def __init__(
        self,
        name: str,
        lease: float,
        state_dir: str,
        store: PostgresStore,
        tasks: TaskTable,
        keys: KeyRouting,
        waiters: Waiters,
        children: Children,
        timers: Timers,
        poller: Any,
        commit: Any,
    ) -> None:
        self.name = name
        self.lease = lease
        self._state_dir = state_dir
        self._store = store
        self.table = ClusterTable(store)
        self._tasks = tasks
        self._keys = keys
        self._waiters = waiters
        self._children = children
        self._timers = timers
        self._poller = poller
        self._commit = commit
        self._intake: Intake | None = None
        self._flows: FlowSteps | None = None
        self._attempts: Attempts | None = None
        self._outbox: Outbox | None = None
        self._cancels: dict[str, list[tuple[bytes, int]]] = {}  # task id -> clients waiting for its cancel
        self.me = 0
        self.deadline = math.inf  # monotonic: past it, this member must not run anything
        self.shards: set[int] = set()
        self.clock = False
        self.pool_hint = True  # the pool may hold tasks: look when there is room
        self.pooled = 0  # live tasks in the pool, counted at each renewal (max_queued counts them)
        self._hints: set[str] = set()  # what notifications asked to look at this turn
        self._asked: dict[str, Any] = {}  # task id -> its submit's context, until its verdict comes
        self._listener: Any = None
        self.listen_fd = -1

    def bind(self, intake: Intake, flows: FlowSteps) -> None:
        self._intake, self._flows = intake, flows

    def bind_attempts(self, attempts: Attempts, outbox: Outbox) -> None:
        self._attempts, self._outbox = attempts, outbox

    # ---- joining, renewing, leaving ----------------------------------------------------------
    def join(self) -> None:
        """A new incarnation: earlier ones of this member (dead: we hold their pid lock) are taken
        over at once; then shards, the clock, and LISTEN."""
        began = time.monotonic()
        self.me, stale = self.table.join(self.name, self._state_dir, self.lease)
        self._store.become_member(self.me, self.lease)
        for row in stale:
            self._take_over(row, "an earlier incarnation of this member")
        self._listen()
        self._rebalance()
        self._claim_clock()
        self._commit()
        self._extend(began)
        log.info("cluster member %s joined as incarnation %d with %d shards", self.name, self.me, len(self.shards))
        self._timers.add(self.lease / 4, self.tick)

    def _extend(self, began: float) -> None:
        self.deadline = began + self.lease * (1 - MARGIN)
        self._children.lease(self.deadline)

    def check(self) -> None:
        """Each turn: past the deadline, this member may have been taken over: stop now."""
        if time.monotonic() > self.deadline:
            raise Fenced(
                f"cluster member {self.name} (incarnation {self.me}) could not renew its lease in time "
                "(frozen, or cut off from the store): its actors are stopped and it rejoins"
            )

    def tick(self) -> None:
        """Every quarter lease: renew, take over lost members, balance shards, and look at
        everything a notification may have missed."""
        began = time.monotonic()
        try:
            self.relisten()
            self.table.renew(self.lease)
            for row in self.table.expired():
                self._take_over(row, f"cluster member {row.name} (host {row.host}, pid {row.pid}) was lost")
            self._rebalance()
            self._claim_clock()
            self._hints.update(("admit", "verdict", "cancel", "cancelled", "ev"))
            self.service()
            self.pool_hint = True
            self.pooled = self.table.pool_size()
            self._adopt_waiting_steps()
            self._ended_elsewhere(None)
            self._commit()
            self._extend(began)
        finally:
            self._timers.add(self.lease / 4, self.tick)

    def leave(self) -> None:
        """A graceful stop, its actors stopped: hand everything over now."""
        self.table.leave()
        self.shards.clear()
        self.clock = False
        log.info("cluster member %s (incarnation %d) left: its shards and tasks are handed over", self.name, self.me)

    def close(self) -> None:
        if self._listener is not None:
            try:
                self._poller.unregister(self.listen_fd)
            except KeyError:
                pass
            try:
                self._listener.close()
            except Exception:
                pass
            self._listener, self.listen_fd = None, -1

    # ---- lost members ------------------------------------------------------------------------
    def _take_over(self, row: MemberRow, why: str) -> None:
        """Its running attempts end as crashed (retried if they may be); the rest goes to the pool
        or waits for its shard's next holder."""
        assert self._intake is not None
        running = self.table.running_of(row.id)
        for task in running:
            self._intake.crashed(task, why)
        self.table.release_member(row.id)
        self._adopt_waiting_steps()
        log.warning("%s: took over (%d running attempts ended as crashed)", why, len(running))

    def _adopt_waiting_steps(self) -> None:
        """Workflow steps waiting for inputs, left by a member that is gone: ours to release."""
        if self.table.claim_waiting_steps():
            assert self._flows is not None
            self._flows.recover()

    # ---- shards and the clock ----------------------------------------------------------------
    def holds(self, key: str) -> bool:
        return shard_of(key) in self.shards

    def _busy(self) -> set[int]:
        """Shards with anything live here: they stay until it is over."""
        busy = {shard_of(t.lock_key) for t in self._tasks if t.lock_key is not None}
        busy.update(shard_of(t.lock_key) for t in self._tasks.abandoned_keys.values() if t.lock_key is not None)
        busy.update(shard_of(key) for key in self._keys.keys_in_flight())
        return busy

    def _rebalance(self) -> None:
        """Hold ceil(SHARDS / live members): claim free shards (and adopt their live tasks), or
        give back idle ones above that."""
        target = math.ceil(SHARDS / max(1, self.table.live_count()))
        if len(self.shards) < target:
            new = self.table.claim_shards(target - len(self.shards))
            if new:
                self.shards.update(new)
                adopted = self.table.shard_tasks(new)
                assert self._intake is not None
                self._intake.adopt(adopted)
                if adopted:
                    self._keys.rekey()
        elif len(self.shards) > target:
            idle = sorted(self.shards - self._busy())[: len(self.shards) - target]
            self.table.give_shards(idle)
            self.shards.difference_update(idle)

    def _claim_clock(self) -> None:
        if not self.clock and self.table.claim_clock():
            self.clock = True
            clock = self._children.get("c0")
            if clock is not None:  # its next incarnation reads the committed slots and goes on
                self._children.replace(clock)
            log.info("cluster member %s runs the clock (schedules fire here)", self.name)

    # ---- notifications -----------------------------------------------------------------------
    def _listen(self) -> None:
        from ..store.postgres import listener

        self.close()
        try:
            self._listener = listener(self._store)
            self.listen_fd = self._listener.fileno()
            self._poller.register(self.listen_fd, 1)  # zmq.POLLIN
        except Exception as exc:  # polling at each renewal still finds everything
            log.warning("cluster member %s cannot LISTEN (%s): it polls every %.1f s", self.name, exc, self.lease / 4)
            self._listener, self.listen_fd = None, -1

    def on_notify(self) -> None:
        """What the LISTEN connection received (a broken one is closed: the renewals poll)."""
        from ..store.postgres import notes

        if self._listener is None:
            return
        try:
            payloads = notes(self._listener)
        except Exception as exc:
            log.warning("cluster member %s lost its LISTEN connection (%s): it polls until it is back", self.name, exc)
            self.close()
            return
        for payload in payloads:
            if payload.startswith("done "):
                self._ended_elsewhere(payload[5:].split())
            elif payload == "pool":
                self.pool_hint = True
                if self.clock:  # it may hold a delayed task: the clock looks again
                    self._tasks.want_clock()
            elif payload.startswith(("verdict ", "cancelled ")):
                kind, _, member = payload.partition(" ")
                if member == str(self.me):
                    self._hints.add(kind)
            else:
                self._hints.add(payload)

    def service(self) -> None:
        """Act on the turn's hints: admissions to decide, verdicts to answer, shards to balance."""
        hints, self._hints = self._hints, set()
        if not hints:
            return
        if "member" in hints:
            self._rebalance()
        if "admit" in hints:
            self._decide_asked()
        if "verdict" in hints:
            self._read_verdicts()
        if "cancel" in hints:
            self._cancel_asked()
        if "cancelled" in hints:
            self._read_cancels()
        if "ev" in hints:
            self._waiters.recheck_polls()

    def relisten(self) -> None:
        if self._listener is None:
            self._listen()

    # ---- admissions across members -----------------------------------------------------------
    def ask(self, row: Any, context: Any) -> None:
        """A locked submit whose shard another member holds: ask it (answered by ``verdicts``)."""
        assert row.lock_key is not None
        self._asked[row.id] = context
        self.table.ask(row, shard_of(row.lock_key))

    def ask_step(self, row: StoredTask, key: str, admission: Admission) -> bool:
        """A released locked workflow step whose key's shard another member holds: ask it (True),
        or False when the shard is ours (decided here, as on one supervisor)."""
        if self.holds(key):
            return False
        self._asked[row.id] = admission
        task = NewTask(
            row.id,
            row.name,
            QUEUED,
            key,
            row.session_id,
            row.session_owner,
            admission.args,
            time.time(),
            None,
            row.priority,
            row.rate_key,
        )
        self.table.ask(task, shard_of(key), kind="step")
        return True

    def _decide_asked(self) -> None:
        assert self._intake is not None
        for asked in self.table.take_asked(sorted(self.shards)):
            self._intake.admit_asked(asked)

    def answer(self, asked: Asked, verdict: str, holder: str | None) -> None:
        self.table.answer(asked.task_id, asked.origin, verdict, holder)

    def _read_verdicts(self) -> None:
        if not self._asked:
            return
        assert self._intake is not None
        assert self._flows is not None
        for task_id, verdict, holder in self.table.verdicts():
            context = self._asked.pop(task_id, None)
            if isinstance(context, Admission):
                self._flows.admitted_elsewhere(context, verdict, holder)
            elif context is not None:
                self._intake.remote_decided(context, verdict, holder)

    # ---- cancels across members -------------------------------------------------------------
    def cancel_elsewhere(self, task_id: str, ident: bytes, req: int) -> None:
        """A client asks to cancel a task another member holds: ask it; answered when it says."""
        self._cancels.setdefault(task_id, []).append((ident, req))
        self.table.ask_cancel(task_id)

    def _cancel_asked(self) -> None:
        """Cancels asked of the tasks we hold: True when we cancelled it, False when it ended first."""
        assert self._intake is not None and self._attempts is not None
        for task_id, origin in self.table.cancels_for_us():
            task = self._intake.load_stored(task_id)
            if task is not None:
                self._attempts.cancel(task)
            self.table.answer_cancel(task_id, origin, task is not None)

    def _read_cancels(self) -> None:
        """Answers to our cancels; one left unanswered because its task went to the pool (its
        holder was lost) is cancelled here, and one whose task ended is answered False."""
        if not self._cancels:
            return
        assert self._intake is not None and self._attempts is not None and self._outbox is not None
        answers = dict(self.table.cancel_answers())
        for task_id in list(self._cancels):
            answer = answers.get(task_id)
            if answer is None:
                task = self._intake.load_stored(task_id)  # in memory, or claimed from the pool
                if task is not None:
                    self._attempts.cancel(task)
                    answer = True
                else:
                    info = self._store.info(task_id)
                    if info is not None and info["state"] in LIVE:
                        continue  # its holder has not answered yet
                    answer = False
                self.table.drop_cancel(task_id)
            for ident, req in self._cancels.pop(task_id):
                self._outbox.reply(ident, req, True, answer)

    # ---- outcomes of tasks that ran elsewhere ------------------------------------------------
    def _ended_elsewhere(self, ids: list[str] | None) -> None:
        """Tasks that ended on another member (``ids``; None: every one waited for or watched by a
        workflow step and not held here, the fallback for a lost notification): answer their
        waits, and release the workflow steps that waited for them."""
        tasks, flows = self._tasks, self._flows
        assert flows is not None
        if ids is None:
            ids = [t for t in self._waiters.waited() if t not in tasks]
            ids += [t for t in flows.watched if t not in tasks and t not in flows][:FALLBACK_LOOKS]
            ids = self._store.ended(ids) if ids else []  # one look for all of them
        for task_id in ids:
            if task_id in tasks:
                continue
            self._waiters.settle_stored(task_id)
            if task_id in flows.watched and task_id not in flows:
                outcome = self._store.outcome(task_id)
                if outcome is not None and outcome[0] not in LIVE:
                    state, result, (etype, emsg, trace) = outcome
                    error = None if state == SUCCEEDED else (etype or "TaskFailed", emsg or "", trace or "")
                    flows.ended(task_id, state, result or b"", error)

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return self.table.members(), {"id": self.me, "name": self.name}
