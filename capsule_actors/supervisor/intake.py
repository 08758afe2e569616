"""Tasks coming in: submits (validated, recorded, or sent for lock admission first), journals of
clients that died, schedule firings, delayed tasks coming due, the tasks recovered from the store
at start, and the backlog that keeps a deep queue in the store rather than in memory."""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import journal, messages
from ..errors import (
    Backpressure,
    CapsuleError,
    CapsuleInternalError,
    ProtocolError,
    SerializationError,
    StoreFull,
    StoreUnavailable,
    WorkerCrashed,
)
from ..flows import FLOW_TASK, WAITING
from ..ids import new_task_id
from ..states import FAILED, QUEUED, RUNNING, SCHEDULED, TaskState
from ..store import NewTask, StoredTask
from .cluster import CLUSTER_WINDOW
from .flows import Admission
from .nodes import NODE_LOSS
from .tasks import LiveTask, PendingSubmit

if TYPE_CHECKING:
    from ..app import App, Task
    from ..store import Error, TaskStore
    from ..store.cluster import Asked
    from .cluster import Membership
    from .flows import FlowSteps
    from .keys import Decision, KeyRouting
    from .outbox import Frames, Outbox
    from .tally import TaskTally
    from .tasks import TaskTable
    from .timers import Timers
    from .waiters import Waiters

log = logging.getLogger("capsule_actors.supervisor")

QUEUE_WINDOW = 10_000  # queued unlocked tasks of one priority held in memory; more wait in the store only (the backlog)
JOURNAL_SWEEP = 1.0  # how often the submit journals of clients that died are looked for
NO_ARGS = pickle.dumps(((), {}), protocol=5)  # a scheduled firing's arguments (none)


class Intake:
    """Records what is submitted; keeps the backlog's count and mark."""

    def __init__(
        self,
        app: App,
        store: TaskStore,
        tasks: TaskTable,
        keys: KeyRouting,
        flows: FlowSteps,
        waiters: Waiters,
        outbox: Outbox,
        timers: Timers,
        state_dir: Path,
        commit: Callable[[], None],
        tally: TaskTally,
        cluster: Membership | None = None,
    ) -> None:
        self._app = app
        self._store = store
        self._tasks = tasks
        self._keys = keys
        self._flows = flows
        self._waiters = waiters
        self._outbox = outbox
        self._timers = timers
        self._state_dir = state_dir
        self._commit = commit  # the loop's commit (journals are removed only once their tasks are in)
        self._tally = tally
        self._cluster = cluster  # a cluster member: a pool instead of a backlog, admissions across members
        # Unlocked QUEUED tasks of a priority beyond QUEUE_WINDOW of it stay in the store only:
        # per priority, all of them have a rowid above that priority's mark, and page_in loads
        # them in submit order as that priority's queue drains: [count, mark] by priority.
        self._backlog: dict[int, list[int]] = {}
        # Unlocked items of the client Submits of this drain, recorded together by flush(): one
        # insert for all of them (on PostgreSQL one round trip, not one per message).
        self._batch: list[NewTask] = []
        self._batched: list[PendingSubmit] = []
        self._acks_due: list[PendingSubmit] = []  # journaled submits recorded, their acks not built yet
        # The traceparent of submitted items until they are recorded, then kept by their LiveTask
        # or, for a task held in the store only (delayed, or in the backlog), in _stored_traces
        # until it is loaded. Memory only: a supervisor restart loses them.
        self._traces: dict[str, str] = {}
        self._stored_traces: dict[str, str] = {}

    @property
    def backlog(self) -> int:
        """Queued tasks in the store only."""
        return sum(count for count, _ in self._backlog.values())

    def live_count(self) -> int:
        """Queued, scheduled or running tasks: in memory, in the backlog, or batched (and, for a
        cluster member, in the cluster's pool as last counted)."""
        pooled = self._cluster.pooled if self._cluster is not None else 0
        return len(self._tasks) + self.backlog + len(self._batch) + pooled

    # ---- submits -----------------------------------------------------------------------------
    def on_submit(self, ident: bytes, msg: messages.Submit, payload: Frames) -> None:
        app = self._app
        if len(payload) != len(msg.items):
            raise ProtocolError(f"Submit has {len(msg.items)} items but {len(payload)} payload frames")
        for item, frame in zip(msg.items, payload):
            app.get_task(item[1])
            if len(frame) > app.max_payload_bytes:
                raise SerializationError(f"payload of {len(frame)} bytes is over max_payload_bytes")
        if not msg.journaled:  # a journaled one is acknowledged already (its journal has it): recorded
            self.refuse_if_full()
        if not msg.journaled and self.live_count() + len(msg.items) > app.max_queued:
            raise Backpressure(
                f"{self.live_count()} tasks are queued, scheduled or running and this submit adds "
                f"{len(msg.items)}: over max_queued={app.max_queued}; retry later or raise App(max_queued=...)"
            )
        pending = PendingSubmit(ident, msg.req, len(msg.items), push=msg.push, journaled=msg.journaled)
        pending.remaining += 1  # answered once flush() has recorded its unlocked items
        self._batched.append(pending)
        self.submit(pending, msg.items, payload, batch=self._batch)

    def flush(self) -> None:
        """Record the unlocked items of the Submits batched so far, then answer those whose
        locked items (if any) are decided too. Called after each drain of the client sockets and
        before any other request is handled, so nothing else ever sees a batched task missing."""
        if not self._batched:
            return
        rows, pendings = self._batch, self._batched
        self._batch, self._batched = [], []
        try:
            self._record(rows, None, False)
        except StoreUnavailable:  # the supervisor stops, these unanswered (as in on_message)
            raise
        except Exception as exc:  # these submits fail (as each would have alone); the rest is served
            for row in rows:
                self._traces.pop(row.id, None)
            if not isinstance(exc, CapsuleError):
                log.exception("internal error while recording %d submitted tasks", len(rows))
                exc = CapsuleInternalError(f"{type(exc).__name__}: {exc}")
            for pending in pendings:
                if pending.ident:
                    self._outbox.error(pending.ident, pending.req, exc)
                pending.ident = b""  # answered: its locked items' decisions answer nobody
            return
        for pending in pendings:
            pending.remaining -= 1
            if not pending.remaining:
                if pending.journaled:  # its ack waits for a commit anyway: built after the Runs go
                    self._acks_due.append(pending)
                else:
                    self._complete(pending)

    def ack_journaled(self) -> None:
        """Acknowledge the journaled submits recorded this turn (the supervisor calls this once
        the turn's Runs are sent, and before any commit)."""
        if self._acks_due:
            due, self._acks_due = self._acks_due, []
            for pending in due:
                self._complete(pending)

    def refuse_if_full(self) -> None:
        """New tasks wait for room: the store keeps what is left for the tasks it has."""
        space = self._store.space()
        if space.full:
            raise StoreFull(
                f"the task store {space.path!r} is out of disk space ({space.free_bytes / 2**20:.1f} MiB free "
                "on its file system): new tasks are refused until space is freed there; the tasks already "
                "accepted go on"
            )

    def submit(
        self, pending: PendingSubmit, items: list[list[Any]], payload: Frames, batch: list[NewTask] | None = None
    ) -> None:
        """Record unlocked items now (or add them to ``batch``, for flush()); send locked ones to
        their owners for admission first."""
        now = time.time()
        rows = []
        for i, (item, frame) in enumerate(zip(items, payload)):
            task_id, name, lock_key, sid, sowner, run_at = item[:6]
            priority, rate_key = item[6:8] if len(item) > 6 else (0, None)  # an older client's journal: 0
            if len(item) > 8 and item[8]:
                self._traces[task_id] = item[8]
            state = SCHEDULED if run_at and run_at > now else QUEUED
            if run_at == WAITING:  # a workflow step waiting for its inputs (flows.py): no run_at
                state, run_at = SCHEDULED, None
            row = NewTask(task_id, name, state, lock_key, sid, sowner, frame, now, run_at, priority, rate_key)
            pending.results[i] = [task_id, False, False]
            if lock_key is None or task_id in self._tasks or self._store.exists(task_id):
                rows.append(row)  # unlocked, or a resent submit that is already recorded
                continue
            pending.remaining += 1
            if self._cluster is not None and not self._cluster.holds(lock_key):
                self._cluster.ask(row, (pending, i, row))  # its shard's holder, another member, decides
                continue
            self._keys.admit(task_id, lock_key, name, (pending, i, row))
        if batch is not None:
            batch.extend(rows)
        else:
            self._record(rows, None, False)
        if not pending.remaining:
            self._complete(pending)

    def on_admitted(self, decisions: list[Decision]) -> None:
        """Owners decided locked items: record the ones that run or queue; answer the rest.
        (Released workflow steps are FlowSteps' to decide about.)"""
        for context, verdict, holder, slot in decisions:
            if isinstance(context, Admission):
                self._flows.admitted(context, verdict, holder, slot)
                continue
            if self._cluster is not None and not isinstance(context, tuple):  # asked by another member
                self._decided_asked(context, verdict, holder, slot)
                continue
            pending, i, row = context
            if verdict in ("run", "queue"):
                self._record([row], slot, verdict == "queue")
            else:
                self._traces.pop(row.id, None)
                pending.results[i] = [holder, verdict == "join", verdict == "reject"]
            pending.remaining -= 1
            if not pending.remaining:
                self._complete(pending)

    def remote_decided(self, context: Any, verdict: str, holder: str | None) -> None:
        """The member holding a locked item's shard decided it (and, for run or queue, recorded it)."""
        pending, i, row = context
        self._traces.pop(row.id, None)
        recorded = verdict in ("run", "queue")
        pending.results[i] = [row.id if recorded else holder, verdict == "join", verdict == "reject"]
        pending.remaining -= 1
        if not pending.remaining:
            self._complete(pending)

    def admit_asked(self, asked: Asked) -> None:
        """Another member's locked submit, in one of our shards: our key owner decides it."""
        assert self._cluster is not None and asked.row.lock_key is not None
        if asked.kind == "step":  # a workflow step, recorded (waiting) by the member that holds its workflow
            self._keys.admit(asked.task_id, asked.row.lock_key, asked.row.name, asked)
            return
        if asked.task_id in self._tasks or self._store.exists(asked.task_id):  # decided and recorded before
            self._cluster.answer(asked, "run", None)
            return
        if asked.row.name not in self._app.tasks:  # recorded, failed at once (its asker hears of its end)
            self._store.insert_tasks([asked.row])
            self._store.notify_done.add(asked.task_id)  # type: ignore[attr-defined]
            self._unknown(asked.row)
            self._cluster.answer(asked, "run", None)
            return
        self._keys.admit(asked.task_id, asked.row.lock_key, asked.row.name, asked)

    def _decided_asked(self, asked: Asked, verdict: str, holder: str | None, slot: str) -> None:
        assert self._cluster is not None
        if asked.kind == "step" and verdict in ("run", "queue"):
            row = asked.row
            assert row.lock_key is not None
            if not self._cluster.table.claim_step(asked.task_id):  # it ended meanwhile (its workflow cancelled)
                self._keys.free(asked.task_id, row.lock_key, slot)
                verdict = "gone"
            else:  # ours now: held as a local step admitted (run, or queued behind the holder)
                self._store.lock_step(row.id, row.lock_key, row.args)
                self._store.requeue(row.id, row.session_id, None, None)
                self.hold_step(row.id, slot, verdict == "queue")
        elif verdict in ("run", "queue"):
            self._record([asked.row], slot, verdict == "queue")
            self._store.notify_done.add(asked.task_id)  # type: ignore[attr-defined]
        self._cluster.answer(asked, verdict, holder)

    def _complete(self, pending: PendingSubmit) -> None:
        """Every item is decided: acknowledge the client, or record the schedule's fired slot."""
        if pending.fire is not None:
            self._store.set_last_slot(*pending.fire)
            return
        if not pending.ident:  # replayed from a journal whose writer is gone: nobody to answer
            return
        items = []
        for i, result in enumerate(pending.results):
            assert result is not None
            task_id, deduplicated, conflict = result
            push_req = pending.push[i] if pending.push else None
            # pushed: the outcome comes as the reply to push_req, as if Wait(push_req, id) came now;
            # not for a refused task, nor one held in the store only (the backlog, a delayed task)
            pushed = push_req is not None and not conflict and task_id in self._tasks
            if pushed:
                self._waiters.wait(task_id, pending.ident, push_req)  # type: ignore[arg-type]
            items.append(messages.AckItem(task_id, deduplicated, conflict, pushed))
        # no room while the store is full: clients stop journaling and hear StoreFull at submit()
        room = 0 if self._store.space().full else max(0, self._app.max_queued - self.live_count())
        ack = messages.SubmitAck(items, room)
        self._outbox.reply(pending.ident, pending.req, True, ack.to_wire(), after_commit=pending.journaled)

    def _record(self, rows: list[NewTask], slot: str | None, blocked: bool) -> None:
        tasks = self._tasks
        by_id = {r.id: r for r in rows}
        traces = {r.id: self._traces.pop(r.id) for r in rows if r.id in self._traces} if self._traces else None
        timed = self._tally.enabled
        pooled = self._to_pool(rows) if self._cluster is not None else ()
        recorded = self._store.insert_tasks(rows, pooled)
        for task_id, rowid in recorded:
            row = by_id[task_id]
            if timed:
                self._tally.count("submitted", row.name)
            if row.state == SCHEDULED and row.lock_key is None:
                if row.run_at is None:  # a workflow step waiting for its inputs
                    self._flows.add(task_id, row.session_id, row.args)
                else:
                    tasks.want_clock()  # unlocked delayed tasks stay in the store until the clock says
                self._keep_trace(task_id, traces)
                continue
            if task_id in pooled or (
                self._cluster is None and row.lock_key is None and self._to_backlog(rowid, row.priority)
            ):
                self._keep_trace(task_id, traces)
                continue
            task = LiveTask(
                task_id,
                row.name,
                row.state,
                0,
                row.lock_key,
                row.session_id,
                row.session_owner,
                owner=slot,
                blocked=blocked,
                run_at=row.run_at,
                priority=row.priority,
                rate_key=row.rate_key,
            )
            if traces:
                task.trace = traces.get(task_id)
            tasks.add(task)
            if not blocked:
                tasks.queue(task, row.run_at)
        if pooled:
            assert self._cluster is not None
            self._cluster.pooled += sum(1 for task_id, _ in recorded if task_id in pooled)
            self._cluster.table.notify("pool")
        self._flows.release_ready()

    def _to_pool(self, rows: list[NewTask]) -> set[str]:
        """A cluster member's new unlocked tasks that go to the pool, recorded there at once: the
        delayed ones, and the queued ones beyond CLUSTER_WINDOW of their priority in memory."""
        room: dict[int, int] = {}
        pooled = set()
        for row in rows:
            if row.lock_key is not None or (row.state == SCHEDULED and row.run_at is None):
                continue  # locked: its shard's; a waiting workflow step: its workflow's member's
            if row.state == SCHEDULED:
                pooled.add(row.id)
                continue
            free = room.get(row.priority)
            if free is None:
                free = CLUSTER_WINDOW - self._tasks.queued_at(row.priority)
            if free > 0:
                room[row.priority] = free - 1
            else:
                pooled.add(row.id)
        return pooled

    def hold_step(self, task_id: str, slot: str, blocked: bool) -> None:
        """A released locked workflow step that its key's owner admitted (run, or queue behind
        the holder) and FlowSteps made QUEUED with its key: held as an admitted submit is."""
        row = self._store.live_task(task_id)
        if row is None:
            return
        task = self._load(row, QUEUED)
        task.owner, task.blocked = slot, blocked
        if not blocked:
            self._tasks.queue(task, None)

    def _keep_trace(self, task_id: str, traces: dict[str, str] | None) -> None:
        """A traced task held in the store only (delayed, or in the backlog) keeps its trace
        context here until it is loaded: only traced tasks pay (about 0.2 KB each)."""
        trace = traces.get(task_id) if traces else None
        if trace is not None:
            self._stored_traces[task_id] = trace

    # ---- journals of clients that died -------------------------------------------------------
    def replay_journals(self) -> None:
        """Record what clients that died left in their submit journals (``journal.py``), through
        the same validation as a Submit; ids already recorded are ignored. Runs every second."""
        try:
            self._replay_orphans()
            for path in journal.remove_stale_temps(self._state_dir):
                log.warning("removed %s, a submit journal whose making failed (it held no record)", path.name)
        finally:  # a sweep that failed must not be the last one
            self._timers.add(JOURNAL_SWEEP, self.replay_journals)

    def _replay_orphans(self) -> None:
        """Record the journals of dead writers, commit, then remove them, or keep aside those
        that could not be read whole."""
        replayed: list[Path] = []
        kept: list[tuple[Path, str | None, str | None]] = []  # path, why it is foreign, its damage
        for path, contents in journal.orphaned(self._state_dir):
            foreign = self._record_journal(path, contents)
            damage = contents.damage()
            if foreign or damage:
                kept.append((path, foreign, damage))
            else:
                replayed.append(path)
        if replayed or kept:
            self._commit()  # recorded before the journals go
            self._store.begin()
            for path in replayed:
                path.unlink(missing_ok=True)
            for path, foreign, damage in kept:
                self._keep_aside(path, foreign, damage)

    def _record_journal(self, path: Path, contents: journal.Contents) -> str | None:
        """Submit every message of one journal; what makes it another version's, or None."""
        foreign = contents.foreign
        for frames in contents.messages:
            try:
                msg = messages.decode(frames[0])
                if not isinstance(msg, messages.Submit):
                    raise ProtocolError(f"{type(msg).__name__} is not a submit")
                self.on_submit(b"", msg, frames[1:])
            except ProtocolError as exc:  # not a record this version can read
                foreign = foreign or f"a record in it does not decode: {exc}"
            except CapsuleError as exc:  # readable, refused (say, its task is gone from the app)
                log.warning("a submit in journal %s was not recorded: %s", path.name, exc)
        return foreign

    @staticmethod
    def _keep_aside(path: Path, foreign: str | None, damage: str | None) -> None:
        """Rename a journal that could not be read whole to NAME.journal.unreadable, and say why."""
        kept = journal.set_aside(path).name
        if damage:
            log.error(
                "journal %s is damaged: %s; every intact submit in it (before and after) is recorded, "
                "and the file is kept as %s (never replayed) for inspection",
                path.name,
                damage,
                kept,
            )
        if foreign:
            log.error(
                "journal %s cannot be replayed whole (%s); its readable submits are recorded and the "
                "file is kept as %s: to replay it, rename it back and start the capsule_actors version "
                "that wrote it (%s)",
                path.name,
                foreign,
                kept,
                messages.version_hint(),
            )

    # ---- the backlog -------------------------------------------------------------------------
    def _to_backlog(self, rowid: int, priority: int) -> bool:
        """Leave a new unlocked QUEUED task in the store only when its priority's in-memory queue
        is full (or that priority has a backlog already: submit order is kept). True when it
        was left there. The window is per priority, so a higher priority never waits behind a
        window full of lower ones; memory is bounded by QUEUE_WINDOW per priority in use."""
        level = self._backlog.get(priority)
        if level is None:
            # fewer tasks in memory than the window: its queue has room (the cheap check first)
            if len(self._tasks.live) < QUEUE_WINDOW or self._tasks.queued_at(priority) < QUEUE_WINDOW:
                return False
            level = self._backlog[priority] = [0, rowid - 1]
        level[0] += 1
        return True

    def page_in(self) -> None:
        """Load the oldest backlog tasks of each priority whose queue is half empty. (Tasks a
        limit holds back are not in those queues: a window of them never keeps runnable work
        in the store.) A cluster member claims from the pool instead."""
        if self._cluster is not None:
            self._claim_pool(self._cluster)
            return
        if not self._backlog:
            return
        for priority, level in list(self._backlog.items()):
            queued = self._tasks.queued_at(priority)
            if queued > QUEUE_WINDOW // 2:
                continue
            limit = QUEUE_WINDOW - queued
            rows = self._store.backlog(priority, level[1], limit)
            for row in rows:
                level[1] = row.rowid
                if row.id in self._tasks:  # e.g. a delayed task that came due: it is already here
                    continue
                level[0] -= 1
                self._load(row, QUEUED)
                self._tasks.due(row.id)
            if len(rows) < limit:
                del self._backlog[priority]

    def _claim_pool(self, cluster: Membership) -> None:
        """Take queued tasks from the cluster's pool while our queue is half empty (and the pool
        may have some: a notification or the renewal says so)."""
        room = CLUSTER_WINDOW - self._tasks.queued_count()
        if not cluster.pool_hint or room < CLUSTER_WINDOW // 2:
            return
        rows = cluster.table.claim_queued(room, time.time())
        if len(rows) < room:
            cluster.pool_hint = False
        for row in rows:
            if row.id in self._tasks or self._unknown(row):
                continue
            self._load(row, QUEUED)
            self._tasks.due(row.id)

    def _unknown(self, row: StoredTask | NewTask, since: str = "") -> bool:
        """A task from the store whose name this App does not have (put there by a client or a
        member of another version, or before a deploy that removed it: ``since``): it fails at
        once with UnknownTask instead of reaching a dispatch that cannot run it. True when it did."""
        if row.name in self._app.tasks or row.name == FLOW_TASK:
            return False
        error = ("UnknownTask", f"the app has no task {row.name!r}{since}", "")
        self._store.finish(row.id, row.session_id, FAILED, None, error, time.time())
        self.dead_letter(row.id, row.name, error)
        return True

    def adopt(self, rows: list[StoredTask]) -> None:
        """A cluster member took shards: their live tasks (left by the last holder) are ours,
        each key's first one holding it, as at recovery."""
        now = time.time()
        held = {t.lock_key for t in self._tasks if t.lock_key is not None and not t.blocked}
        for row in rows:
            task = self._recovered(row, now, held)
            if task is not None and task.id not in self._tasks:
                self._tasks.add(task)
                if not task.blocked:
                    self._tasks.queue(task, task.run_at)

    def crashed(self, row: StoredTask, why: str) -> None:
        """A running attempt of a lost cluster member (left in the store for whoever takes it
        next): see ``_crashed``."""
        self._crashed(row, why, None)

    def _crashed(self, row: StoredTask, why: str, run_at: float | None) -> bool:
        """A running attempt that died with its supervisor (``why``): it ends as WorkerCrashed,
        requeued (True) if its task may retry it, else failed for good (a dead letter)."""
        spec = self._spec_of(row.name)
        if spec is not None and row.attempts < 1 + spec.retries and spec.retryable(WorkerCrashed):
            error = ("WorkerCrashed", f"{why} while the task was running; re-running it", "")
            self._store.requeue(row.id, row.session_id, run_at, error)
            return True
        error = ("WorkerCrashed", f"{why} while the task was running and no retry remained", "")
        self._store.finish(row.id, row.session_id, FAILED, None, error, time.time())
        self.dead_letter(row.id, row.name, error)
        return False

    def _spec_of(self, name: str) -> Task[Any, Any] | None:
        """The task's declaration (a workflow record's too), or None: the app has no such task."""
        return self._app.tasks.get(name) or (self._app.get_task(name) if name == FLOW_TASK else None)

    def _live(self, row: StoredTask, state: TaskState) -> LiveTask:
        """The in-memory task of a stored row (with the trace context it kept, if any)."""
        task = LiveTask(
            row.id,
            row.name,
            state,
            row.attempts,
            row.lock_key,
            row.session_id,
            row.session_owner,
            run_at=row.run_at,
            priority=row.priority,
            rate_key=row.rate_key,
        )
        if self._stored_traces:
            task.trace = self._stored_traces.pop(row.id, None)
        return task

    def _load(self, row: StoredTask, state: TaskState) -> LiveTask:
        task = self._live(row, state)
        self._tasks.add(task)
        return task

    def load_stored(self, task_id: str) -> LiveTask | None:
        """Bring an unlocked task held only in the store (SCHEDULED, or QUEUED in the backlog)
        into memory: it is due or being cancelled."""
        task = self._tasks.get(task_id)
        if task is not None:
            return task
        row = self._store.live_task(task_id) if self._cluster is None else self._cluster.table.claim_one(task_id)
        if row is None or row.state not in (SCHEDULED, QUEUED) or row.lock_key is not None or self._unknown(row):
            return None
        level = self._backlog.get(row.priority)
        if row.state == QUEUED and level is not None:
            level[0] -= 1
        return self._load(row, row.state)

    # ---- dead letters ------------------------------------------------------------------------
    def dead_letter(self, task_id: str, name: str, error: Error | None) -> None:
        """A task failed for good: record a run of the App's on_failure hook in this same
        transaction (so a crash loses both or neither), unless the hook itself failed."""
        hook = self._app.failure_hook
        if hook is None or name == hook:
            return
        etype, emsg, trace = error or ("TaskFailed", "", "")
        payload = pickle.dumps(((task_id, name, etype, emsg, trace), {}), protocol=5)
        item = [new_task_id(), hook, None, None, None, None, 0, None]
        self.submit(PendingSubmit(b"", 0, 1), [item], [payload])

    # ---- the clock ---------------------------------------------------------------------------
    def on_fire(self, msg: messages.Fire) -> None:
        """A schedule's slot came: submit its task as the owner session (joining a run that is
        still going), and record the slot in the same transaction as that outcome."""
        spec = self._app.schedules.get(msg.name)
        last = self._store.last_slot(msg.name)
        if spec is None or (last is not None and msg.slot <= last):
            return  # already handled: a restarted clock never fires a slot twice
        task = self._app.tasks[msg.name]
        owner = self._app.owner
        item = [new_task_id(), task.name, task.lock_key((), {}), owner.id, owner.owner, None, task.priority, None]
        self.submit(PendingSubmit(b"", 0, 1, fire=(msg.name, msg.slot)), [item], [NO_ARGS])

    def on_due(self, msg: messages.Due) -> None:
        for task_id in msg.task_ids:
            self.make_due(task_id)

    def make_due(self, task_id: str) -> None:
        """A SCHEDULED task comes due (the clock says), or a workflow step is released."""
        task = self._tasks.get(task_id) or self.load_stored(task_id)
        if task is not None and task.state == SCHEDULED:
            self._store.requeue(task.id, task.session_id, None, None)
            task.state = QUEUED
            self._tasks.due(task.id)

    # ---- recovery at start -------------------------------------------------------------------
    def recover(self) -> None:
        """Take back what the store holds live: queued and scheduled tasks resume (unlocked
        delayed ones stay in the store for the clock; a deep queue stays in the backlog), and
        running ones are run again when retries remain, else fail with WorkerCrashed."""
        now = time.time()
        held: set[str] = set()  # lock keys with a holder: in submit order, the first live task
        for row in self._store.live_tasks():
            task = self._recovered(row, now, held)
            if task is not None:
                self._tasks.add(task)
                if not task.blocked:
                    self._tasks.queue(task, task.run_at)
        if len(self._tasks):
            log.info("recovered %d live tasks from the store", len(self._tasks))

    def _recovered(self, row: StoredTask, now: float, held: set[str]) -> LiveTask | None:
        """The task to hold in memory for ``row``, or None when it stays in the store or ended."""
        if self._unknown(row, " any more"):
            return None
        if row.lock_key is None:
            if row.state == SCHEDULED:
                self._tasks.want_clock()  # stays in the store; the clock hands it over when due
                return None
            if row.state == QUEUED and (row.run_at or 0) <= now and self._to_backlog(row.rowid, row.priority):
                return None
        task = self._live(row, row.state)
        if task.lock_key is not None:
            task.owner = self._keys.owner_of(task.name, task.lock_key)
            task.blocked = task.lock_key in held
            held.add(task.lock_key)
        if task.state != RUNNING:
            return task
        on_node = ":" in (row.slot or "")  # a worker node's actor: retry once its lease ran out
        task.run_at = now + NODE_LOSS if on_node else None
        if not self._crashed(row, "the supervisor died", task.run_at):
            return None
        task.state = QUEUED
        return task
