"""What a task store must do: the interface the supervisor, the clock, the board and the CLI use.

A store keeps tasks, their events, schedule marks, task-card followers and session key-values.
An implementation is one module of this package (``sqlite.py`` today); its callers never see SQL.

Guarantees every implementation gives (the supervisor's correctness rests on them):

- **One writer, explicit transactions.** ``TaskStore`` is used from the supervisor's loop thread
  only. ``begin()`` opens a write transaction (a no-op when one is open); every write until
  ``commit()`` becomes durable atomically, and the supervisor sends no acknowledgement before
  the commit that covers it. ``dirty()`` says whether anything was written since the last commit.
- **Order.** Tasks are kept in submit order (a monotonically increasing ``rowid``); events get a
  strictly increasing ``seq`` in the order they are added, and readers see them in that order.
- **Idempotent inserts.** Inserting a task id that exists changes nothing (resent submits and
  replayed journals rely on it).
- **The hot path** (per task: ``insert_tasks``, ``args`` and ``mark_running``, ``finish``,
  ``add_event``; per turn: ``begin``, ``commit``, ``dirty``, ``take_touched``) must not scan:
  each is a few indexed statements. Everything else runs off the per-task path (status, lists,
  retention, recovery at start).
- **Readers** (``StoreReader``: the board, the clock) see committed data only, each read inside
  ``snapshot()`` consistent with itself, and never block the writer.
- **A full disk loses nothing.** A ``commit()`` that finds no room raises ``StoreFull`` with the
  transaction still open and holding every write made since the last commit (the store redoes
  them if the database rolled them back), so what the supervisor holds in memory stays what the
  store holds, and a later ``commit()`` makes it durable. ``space()`` says when new tasks must be
  refused (the store keeps room in reserve for the writes that finish the tasks it has).
- **A damaged store is refused.** ``check()`` (before serving) raises ``StateDirError`` naming
  the file, what is wrong and what to do.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Collection, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ConfigError, ProtocolError, StateDirError
from ..states import TaskState

if TYPE_CHECKING:
    from ..messages import SessionKV


class NewTask(NamedTuple):
    """A task to record (a submit's item, decided)."""

    id: str
    name: str
    state: TaskState
    lock_key: str | None
    session_id: str | None
    session_owner: str | None
    args: bytes
    created_at: float
    run_at: float | None
    priority: int = 0  # higher starts first
    rate_key: str | None = None  # the formatted key of a keyed rate limit


CRASHED_PATTERN = "%WorkerCrashed:%"  # LIKE: a state event whose error is a crash (requeue or finish)
# An actor process that died unasked (its slot restarts): an event of its own in the event log,
# under the pseudo task id ``actor:SLOT`` (no task has such an id), for the board's Stats view.
ACTOR_EXIT = "actor_exit"
ACTOR_EVENT_PREFIX = "actor:"

# ---- workflows on the board ------------------------------------------------------------------
# A workflow is recorded as a task named FLOW_RECORD (``flows.FLOW_TASK``; the store cannot import
# flows.py, which needs the store) whose first FLOW_EVENT lists its steps and on_error step. With
# that event the store writes, in the same transaction, the flow record's id into each of those
# steps' ``flow_id`` column (schema 3): the board then leaves steps out of its columns
# with a test on the row (``flow_id IS NULL``) and sums a workflow's steps with one index lookup
# (``tasks_flow``: step rows only), never reading every workflow's event.
FLOW_RECORD = "capsule.flow"
FLOW_EVENT = "flow"
BOARD_RUNNING_STEPS = 3  # running steps a workflow's card names (the others are counted)


def flow_members(data: dict[str, Any]) -> list[str]:
    """The step ids a ``flow`` event names: its steps, then its on_error step, if any."""
    steps = [s for s in data.get("steps") or [] if isinstance(s, str)]
    handler = data.get("on_error")
    return [*steps, handler] if isinstance(handler, str) else steps


def flow_kind(value_type: str | None, input_type: str | None) -> str:
    """What a workflow's card calls it, from how its value is made (its ``flow`` event): a list
    of steps' results (``group``), the one step that takes a list (``chord``: a chain that ends in
    a group and a callback), or a step that takes one result (``chain``); else ``workflow``."""
    if value_type == "array":
        return "group"
    if input_type == "array":
        return "chord"
    return "chain" if input_type in ("text", "string") else "workflow"


def board_flows(
    cards: list[dict[str, Any]],
    states: Iterable[tuple[str, str, int]],
    running: Iterable[tuple[str, str, str]],
    shapes: Iterable[tuple[str, str | None, str | None]],
) -> None:
    """Complete the board's workflow cards (in place): ``card["flow"]`` with its kind, its steps
    per state (``states``: flow id, state, steps), the running ones (id and name, at most
    ``BOARD_RUNNING_STEPS``, and how many run); a live record's card is in Running (the
    workflow runs until its record ends, as ``FlowHandle.status()`` says)."""
    by_id = {c["id"]: c for c in cards if c["name"] == FLOW_RECORD}
    flows: dict[str, dict[str, Any]] = {i: {"kind": "workflow", "steps": 0, "states": {}, "running": []} for i in by_id}
    for flow_id, state, n in states:
        flows[flow_id]["states"][state] = int(n)
        flows[flow_id]["steps"] += int(n)
    for flow_id, step_id, name in running:
        if len(flows[flow_id]["running"]) < BOARD_RUNNING_STEPS:
            flows[flow_id]["running"].append({"id": step_id, "name": name})
    for flow_id, value_type, input_type in shapes:
        flows[flow_id]["kind"] = flow_kind(value_type, input_type)
    for flow_id, card in by_id.items():
        card["flow"] = flows[flow_id]
        if card["state"] in ("QUEUED", "SCHEDULED"):
            card["record_state"], card["state"] = card["state"], "RUNNING"


class StatsRows(NamedTuple):
    """What the board's Stats view is drawn from, for the window ``[since, now]`` cut in buckets
    of ``step`` seconds (bucket ``b`` starts at ``since + b * step``). A task is queued from
    ``coalesce(run_at, created_at)`` until ``coalesce(started_at, finished_at)``."""

    finished: list[tuple[int, str, int]]  # (bucket, terminal state, tasks)
    arrivals: list[tuple[int, str, int]]  # (bucket, task name, tasks that joined the queue)
    departures: list[tuple[int, str, int]]  # (bucket, task name, tasks that left it)
    queued_before: list[tuple[str, int]]  # (task name, tasks queued at ``since``)
    run_times: list[tuple[str, float]]  # (task name, seconds from last start to finish), newest first
    crashes: list[tuple[int, int]]  # (bucket, attempts that ended in WorkerCrashed)
    restarts: list[tuple[int, int]]  # (bucket, actor processes that died unasked: ACTOR_EXIT events)


class StoredTask(NamedTuple):
    """A live task as the store holds it (recovery at start, the backlog, a cancel or a due task)."""

    rowid: int
    id: str
    name: str
    state: TaskState
    lock_key: str | None
    session_id: str | None
    session_owner: str | None
    attempts: int
    run_at: float | None
    slot: str | None
    priority: int = 0
    rate_key: str | None = None


Error = tuple[str, str, str]  # (type, message, traceback)


class StoreSpace(NamedTuple):
    """The store's files and the room left for them (``status``, and whether submits are refused)."""

    path: str  # the store's main file
    store_bytes: int  # its size
    wal_bytes: int  # the size of its write-ahead log (0 where there is none)
    free_bytes: int  # free space on their file system
    full: bool  # too little room: new tasks are refused until there is more


class TaskStore(abc.ABC):
    """The supervisor's store: the only writer of tasks, events, schedules and session values."""

    slot_pending: bool  # a schedule's fired slot was written since the last commit

    # ---- transactions ------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self) -> None:
        """Open the turn's write transaction (no-op when open)."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the transaction's writes durable (no-op when none is open). Raises ``StoreFull``
        when there is no room: the transaction stays open with all its writes, to commit later."""

    @abc.abstractmethod
    def dirty(self) -> bool:
        """Rows were written since the last commit (or the last one that found no room)."""

    @abc.abstractmethod
    def maintain(self) -> None:
        """Housekeeping the supervisor runs after it has sent a turn's replies (off the ack path),
        at least once a second: keep the store's files bounded and ``space()`` up to date."""

    @abc.abstractmethod
    def check(self) -> None:
        """Verify the store is intact before serving it, else raise ``StateDirError`` saying
        what is damaged and what to do (a store that fails later would fail mid-flight)."""

    @abc.abstractmethod
    def space(self) -> StoreSpace:
        """The store's size and its file system's free space, as of the last ``maintain()``
        (cheap enough to ask on every submit)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---- tasks -------------------------------------------------------------------------------
    @abc.abstractmethod
    def insert_tasks(self, rows: Iterable[NewTask], pooled: Collection[str] = ()) -> list[tuple[str, int]]:
        """Record new tasks; return (id, rowid) of those that were new (a known id is ignored).
        ``pooled``: ids a cluster member records in its cluster's pool (a store with no cluster
        ignores it)."""

    @abc.abstractmethod
    def args(self, task_id: str) -> bytes:
        """A task's pickled arguments, for its Run: those of a task recorded moments ago are kept
        in memory (``KeptArgs``), so a Run usually goes out without a read."""

    @abc.abstractmethod
    def set_args(self, task_id: str, args: bytes) -> None:
        """Replace a task's pickled arguments (a workflow step released with its inputs)."""

    @abc.abstractmethod
    def lock_step(self, task_id: str, key: str, args: bytes) -> None:
        """A released locked workflow step its key's owner decided about: its lock key, its
        released arguments, and a new place in submit order (for its key it is submitted now:
        recovery and the owners' rebuilds order a key's live tasks by it)."""

    @abc.abstractmethod
    def results(self, task_ids: list[str]) -> dict[str, bytes]:
        """The pickled results of these tasks (a released workflow step's inputs): one query."""

    @abc.abstractmethod
    def flow_waiting(self) -> list[tuple[str, str | None, bytes]]:
        """(id, session id, args) of the workflow steps waiting for their inputs: SCHEDULED without a
        ``run_at``, in submit order (recovery at start; off the hot path)."""

    @abc.abstractmethod
    def mark_running(self, task_id: str, session_id: str | None, attempt: int, slot: str, now: float) -> None:
        """Record an attempt's start (the supervisor writes it once its Run is sent)."""

    @abc.abstractmethod
    def finish(
        self,
        task_id: str,
        session_id: str | None,
        state: TaskState,
        result: bytes | None,
        error: Error | None,
        now: float,
    ) -> None:
        """Record a terminal state with its result or error."""

    @abc.abstractmethod
    def requeue(
        self,
        task_id: str,
        session_id: str | None,
        run_at: float | None,
        error: Error | None,
        attempts: int | None = None,
    ) -> None:
        """Put a task back in the queue (a retry, or a re-run after a stop or crash)."""

    @abc.abstractmethod
    def set_progress(self, task_id: str, fraction: float) -> None: ...

    @abc.abstractmethod
    def add_event(self, task_id: str, session_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """Append an event (its seq follows every event added before it). A ``flow`` event (the
        supervisor's record of a workflow's steps) also writes ``flow_id`` on those steps."""

    @abc.abstractmethod
    def show_card(self, task_id: str, session_id: str) -> dict[str, Any] | None:
        """The session follows the task's card from now on; return the card (None: unknown task)."""

    @abc.abstractmethod
    def take_touched(self) -> tuple[set[str], set[str], bool]:
        """Task ids and session ids that got events since the last call, and whether any did."""

    # ---- reads -------------------------------------------------------------------------------
    @abc.abstractmethod
    def info(self, task_id: str) -> dict[str, Any] | None:
        """The task's record (the fields of ``TaskInfo``), or None."""

    @abc.abstractmethod
    def outcome(self, task_id: str) -> tuple[TaskState, bytes | None, list[str | None]] | None:
        """(state, result, [error_type, error_message, traceback]) of one task."""

    @abc.abstractmethod
    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        """Task records, newest first."""

    @abc.abstractmethod
    def find_ids(self, ending: str, limit: int) -> list[str]:
        """Up to ``limit`` ids that end with ``ending`` (a short id: ``ids.resolve``); a scan, off
        the hot path."""

    @abc.abstractmethod
    def live_tasks(self) -> Iterator[StoredTask]:
        """Every queued, scheduled or running task in submit order (recovery at start)."""

    @abc.abstractmethod
    def backlog(self, priority: int, after: int, limit: int) -> list[StoredTask]:
        """Unlocked QUEUED tasks of one priority past rowid ``after``, in submit order (paged in
        as that priority's queue drains). Priority 0 scans by rowid; others have an index that
        only they enter, so default tasks pay nothing for it."""

    @abc.abstractmethod
    def live_locked(self) -> list[tuple[str, str, str]]:
        """(id, name, lock_key) of every live locked task, in submit order."""

    @abc.abstractmethod
    def live_task(self, task_id: str) -> StoredTask | None:
        """A queued, scheduled or running task (None when finished or unknown)."""

    @abc.abstractmethod
    def count_state(self, state: TaskState) -> int: ...

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Tasks per state."""

    @abc.abstractmethod
    def exists(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    def events_after(
        self, after: int, limit: int = 500, *, task_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Events with seq > ``after`` in order: of one task, of one session, or all."""

    @abc.abstractmethod
    def retry_row(self, task_id: str) -> tuple[Any, ...] | None:
        """(name, state, lock_key, session_id, session_owner, args, priority, rate_key,
        retried_as) of a task, to submit it again."""

    @abc.abstractmethod
    def mark_retried(self, task_id: str, session_id: str | None, new_id: str) -> None:
        """A finished task was submitted again as ``new_id`` (its record says so, and an event)."""

    # ---- retention ---------------------------------------------------------------------------
    # Each call does a bounded amount of work (``batch``), so the loop can spread pruning over
    # its turns; neither scans the tables.
    @abc.abstractmethod
    def prune_events(self, before: float, keep_max: int, batch: int) -> int:
        """Drop up to ``batch`` of the oldest events that are older than ``before`` or not among
        the newest ``keep_max``; return how many went."""

    @abc.abstractmethod
    def prune_finished(self, before: float, batch: int) -> dict[str, int]:
        """Delete up to ``batch`` finished tasks (with their events and card links) that ended
        before ``before``, the longest finished first; return how many went, per state."""

    # ---- schedules ---------------------------------------------------------------------------
    @abc.abstractmethod
    def register_schedules(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        """Know every declared (name, cron, tz); a changed cron or time zone starts it afresh."""

    @abc.abstractmethod
    def schedule_marks(self) -> dict[str, dict[str, float | None]]:
        """name -> {registered_at, last_slot}: where the clock resumes each schedule."""

    @abc.abstractmethod
    def last_slot(self, name: str) -> float | None: ...

    @abc.abstractmethod
    def set_last_slot(self, name: str, slot: float) -> None:
        """Record a fired slot (sets ``slot_pending`` until the commit)."""

    # ---- session key-values ------------------------------------------------------------------
    @abc.abstractmethod
    def kv_get(self, session_id: str, key: str) -> str | None: ...

    @abc.abstractmethod
    def kv_set(self, session_id: str, key: str, text: str) -> None: ...

    @abc.abstractmethod
    def kv_delete(self, session_id: str, key: str) -> bool: ...

    @abc.abstractmethod
    def kv_items(self, session_id: str) -> list[tuple[str, str]]: ...

    def kv_cas(self, session_id: str, key: str, expected: str | None, text: str) -> bool:
        """Set ``key`` to ``text`` if its value is ``expected`` (None: absent). One writer makes
        the read and the write one step; a store that several writers share overrides this."""
        if self.kv_get(session_id, key) != expected:
            return False
        self.kv_set(session_id, key, text)
        return True


_QUOTED: dict[str, str] = {state: json.dumps(state.value) for state in TaskState}


def quoted(text: str) -> str:
    """``json.dumps(text)``, remembered: the state events of every task repeat a few states,
    task names and slots, and json.dumps of a small dict is a third of what writing one costs."""
    found = _QUOTED.get(text)
    if found is None:
        if len(_QUOTED) > 4096:  # names and slots are few; anything else must not grow it
            _QUOTED.clear()
            _QUOTED.update({state: json.dumps(state.value) for state in TaskState})
        found = _QUOTED[text] = json.dumps(text)
    return found


class KeptArgs:
    """New tasks' pickled arguments, kept a while (bounded) by the store that recorded them: a
    task usually starts in the turn that recorded it, and its Run then goes out without reading
    them back (a round trip on PostgreSQL, a statement before the send on SQLite)."""

    LIMIT_BYTES = 8 << 20
    LIMIT_TASKS = 4096

    def __init__(self) -> None:
        self._args: dict[str, bytes] = {}
        self._bytes = 0

    def keep(self, task_id: str, args: bytes) -> None:
        self.take(task_id)
        self._args[task_id] = args
        self._bytes += len(args)
        while self._bytes > self.LIMIT_BYTES or len(self._args) > self.LIMIT_TASKS:  # the oldest go first
            self._bytes -= len(self._args.pop(next(iter(self._args))))

    def take(self, task_id: str) -> bytes | None:
        """The kept arguments (forgotten here), or None: read them from the store."""
        args = self._args.pop(task_id, None)
        if args is not None:
            self._bytes -= len(args)
        return args


def check_schema(found: int, known: int, where: str) -> None:
    """A reader meets the store's schema version: only the version it was written for reads
    right (an older store lacks columns, a newer one may mean other things)."""
    if found < known:
        raise StateDirError(
            f"{where} has schema version {found}, older than this capsule_actors reads ({known}): "
            "start its supervisor once with this version (it upgrades the store at start), "
            "or read it with the version that wrote it"
        )
    if found > known:
        raise StateDirError(
            f"{where} has schema version {found}, newer than this capsule_actors knows ({known}): "
            "read it with the version that wrote it"
        )


class StoreReader(abc.ABC):
    """Read-only access for other processes (the board, the clock, the CLI while no supervisor
    runs): never blocks the writer, and never creates, migrates or locks anything."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see one consistent committed state."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The newest event's seq (0 when none)."""

    @abc.abstractmethod
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
        """Every column's count under the substring filters (``task_id``: a full or short id, or
        any part of one) and one page of its cards. A workflow is one card (its steps are not
        cards): in Running until its record ends, then in the record's state, with ``flow``
        (``board_flows``); it matches a filter that it or one of its steps matches. Each column
        also says how many workflow steps (matching the filters) are in its state: ``steps``."""

    @abc.abstractmethod
    def info(self, task_id: str) -> dict[str, Any] | None:
        """The task's record (the fields of ``TaskInfo``), or None (``TaskStore.info``)."""

    @abc.abstractmethod
    def list_tasks(self, state: TaskState | None, limit: int) -> list[dict[str, Any]]:
        """Task records, newest first (``TaskStore.list_tasks``)."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Tasks per state."""

    @abc.abstractmethod
    def find_ids(self, ending: str, limit: int) -> list[str]:
        """Up to ``limit`` ids that end with ``ending`` (``TaskStore.find_ids``)."""

    @abc.abstractmethod
    def flow_steps(self, flow_id: str) -> dict[str, Any] | None:
        """A workflow's steps for the board: its ``flow`` event (steps, inputs, on_error) and, per
        step, id, name, state, attempts and error; None when ``flow_id`` is no workflow."""

    @abc.abstractmethod
    def task_detail(self, task_id: str, max_events: int = 200) -> dict[str, Any] | None:
        """One task: its record, the sizes of its pickled arguments and result, its last events."""

    @abc.abstractmethod
    def stats_rows(self, since: float, step: float, limit: int) -> StatsRows:
        """The board's Stats view since ``since``, in buckets of ``step`` seconds: grouped in SQL
        (a few rows per bucket), but for the last ``limit`` run times. Scans the tasks that
        finished or were created since then (the ``finished_at`` index) and the event log's
        crash outcomes (a scan of the events of the window)."""

    @abc.abstractmethod
    def due_scheduled(self, now: float, limit: int) -> list[str]:
        """Ids of SCHEDULED tasks due at ``now``, soonest first."""

    @abc.abstractmethod
    def next_scheduled_after(self, now: float) -> float | None:
        """When the next SCHEDULED task not due at ``now`` is due."""

    @abc.abstractmethod
    def close(self) -> None: ...


def check_session_kv(msg: SessionKV, max_payload_bytes: int) -> None:
    """A value must be JSON and fit max_payload_bytes (checked before anything is written)."""
    if msg.value is not None:
        if len(msg.value) > max_payload_bytes:
            raise ConfigError(f"session.db value of {len(msg.value)} bytes is over max_payload_bytes")
        try:
            json.loads(msg.value)
        except ValueError:
            raise ProtocolError("SessionKV value is not JSON") from None


def session_kv(store: TaskStore, msg: SessionKV) -> Any:
    """Do one checked ``session.db`` operation on ``store``: its answer (a supervisor's, and the
    store-only client's)."""
    sid, key = msg.session_id, msg.key
    if msg.op == "get":
        return store.kv_get(sid, key)
    if msg.op == "set":
        store.kv_set(sid, key, msg.value or "null")
        return True
    if msg.op == "del":
        return store.kv_delete(sid, key)
    if msg.op == "items":
        return [list(row) for row in store.kv_items(sid)]
    return store.kv_cas(sid, key, msg.expected, msg.value or "null")  # cas


EVENT_PAGE = 500  # events per answer to an events long poll
PollKey = tuple[str, str]  # ("t", task id) | ("s", session id) | ("a", ""): what an events poll follows


def events_page(store: TaskStore, key: PollKey, after: int, held: bool = False) -> dict[str, Any] | None:
    """The answer to an events long poll (a supervisor's, and the store-only client's), or None
    while there is nothing to say. A task's end is read before its events, so every event up to
    its end is among them even when another writer (a cluster member) ends it in between.
    ``held``: the task is live in the caller's memory (no need to ask the store)."""
    kind, value = key
    if kind == "t":
        terminal = not held and store.live_task(value) is None
        events = store.events_after(after, EVENT_PAGE, task_id=value)
    elif kind == "s":
        terminal, events = False, store.events_after(after, EVENT_PAGE, session_id=value)
    else:
        terminal, events = False, store.events_after(after, EVENT_PAGE)
    if not events and not terminal:
        return None
    return {"events": events, "terminal": terminal, "more": len(events) == EVENT_PAGE}
