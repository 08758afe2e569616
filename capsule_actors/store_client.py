"""The store-only client: app code on a host where no supervisor runs submits straight into a
cluster's PostgreSQL store (``CAPSULE_STORE=postgresql://…`` or ``App(store=…)``; the rule that
chooses it is ``bootstrap.store_only``, applied by ``App.client()``).

``StoreClient`` offers what handles, sessions and ``App`` use of a ``Client``
(``client.AppClient``) and answers each request from the store itself, as a supervisor would:

- **Submits** are durable at their commit. Unlocked tasks go into the pool (``tasks.owner`` 0,
  no origin), each with its state event, in one transaction that also sends ``NOTIFY pool``:
  members claim queued ones when they have room (woken by that note, else at their next
  renewal), and the member running the clock hands delayed ones over when they are due. A locked
  task is asked of the member holding its key's shard (``admissions``, as one member asks
  another): the submit waits for that decision and answers as a supervisor does (``run`` and
  ``queue`` record the task, ``join`` returns the holder's handle, ``reject`` raises
  LockConflict). With no live member for ``NO_MEMBER`` s, what nobody began to decide is
  withdrawn (NotRunning; nothing recorded). Workflows are refused: submit them through a member.
- **Outcomes** (``Wait``): a thread LISTENs on the schema's channel; a member that ends a task it
  did not take in (every unlocked task of this client; a locked one it admitted for us) sends
  ``done IDS``, and the thread answers those waits from the store then. It also looks at every
  outstanding wait each ``POLL`` s: a lost note, or a task another member's client submitted
  (``TaskHandle.from_id``), costs that delay only.
- **Events** (of a task, a session, or all): answered at once when there are some after the
  cursor, else looked for again every ``EVENT_POLL`` s (members send no note per event).
- **Cancels**: a task still in the pool is cancelled here (one statement with its state event,
  and a ``done`` note); one a member holds is asked of it (``cancels``), which answers True or
  False, or hands it back to the pool if it is lost meanwhile (then it is cancelled here).
- ``info`` and ``from_id`` read the store; ``session.db`` reads and writes it
  (compare-and-set in one statement). Task cards shown from app code, status, retries and
  ``InjectCrash`` need a supervisor (NotRunning says so).

Its origin in ``admissions`` and ``cancels`` is a random negative number, never a member's id,
so members address its answers (``verdict ORIGIN``, ``cancelled ORIGIN``) to it alone. Nothing
read from the store is unpickled here: results go to the handle, as a supervisor's reply would.
The statements are ``store/submitter.py``'s and ``store/cluster.py``'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import secrets
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import ids, messages
from .bootstrap import ClientConfig
from .client import Prepared, Submitted, item_cost, wait_request
from .connection import Future, Reply
from .errors import (
    CapsuleError,
    ConfigError,
    NotRunning,
    ProtocolError,
    SerializationError,
    StoreUnavailable,
    UnknownTask,
)
from .lifecycle import current_pid
from .states import LIVE, QUEUED, SCHEDULED, TaskState
from .store.base import FLOW_RECORD, NewTask, PollKey, check_session_kv, events_page, session_kv

if TYPE_CHECKING:
    from .app import App
    from .store.cluster import ClusterTable
    from .store.submitter import PoolWriter

log = logging.getLogger("capsule_actors.client")

POLL = 0.5  # seconds between looks at outstanding waits and answers (notifications are the fast path)
EVENT_POLL = 0.25  # seconds between looks for new events while an events() or subscribe() waits
NO_MEMBER = 10.0  # seconds with no live member before a locked submit or a cancel gives up
T = TypeVar("T")


def _resolve(fut: Future, value: Reply) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_result(value)


def _fail(fut: Future, exc: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_exception(exc)


class StoreClient:
    """One App's requests in this process, answered from the PostgreSQL store (no supervisor)."""

    _shared: dict[tuple[int, int], StoreClient] = {}
    _shared_lock = threading.Lock()

    def __init__(self, app: App, config: ClientConfig, url: str) -> None:
        from .store.cluster import ClusterTable
        from .store.submitter import PoolWriter

        self.app = app
        self.config = config
        self.url = url
        self._pid = current_pid()
        self._db: PoolWriter = PoolWriter(url, app.name)  # the schema is made here if no member ever ran
        self.where = self._db.url  # without its password
        self.origin = -1 - secrets.randbelow(1 << 62)
        self._table: ClusterTable = ClusterTable(self._db)
        self._table.me = self.origin
        self._lock = threading.RLock()  # the store connection, one caller at a time (and what it read)
        self._state = threading.Lock()  # the waits and polls
        self._reqs = itertools.count(1)
        self._waits: dict[str, list[Future]] = {}
        self._polls: dict[int, tuple[Future, PollKey, int]] = {}
        self._decided: dict[str, tuple[str, str | None]] = {}  # verdicts read, until their submit takes them
        self._answers: dict[str, bool] = {}  # cancel answers read, until their cancel takes them
        self._changed = threading.Condition()  # a note said an answer for us is in
        self._generation = 0
        self._listener: Any = None
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._gone: StoreUnavailable | None = None
        self._looked_for_members = False
        self._handlers: dict[type, Callable[[Any, Future], None]] = {
            messages.Wait: self._on_wait,
            messages.Info: self._on_info,
            messages.Cancel: self._on_cancel,
            messages.Events: self._on_events,
            messages.SessionEvents: self._on_session_events,
            messages.AllEvents: self._on_all_events,
            messages.ListTasks: self._on_list,
            messages.SessionKV: self._on_session_kv,
        }

    @classmethod
    def shared(cls, app: App, config: ClientConfig, url: str) -> StoreClient:
        """This process's store-only client for ``app`` (made at first use; a forked child makes its own)."""
        key = (current_pid(), id(app))
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None or client.closed or client.app is not app or client.url != url:
                client = cls._shared[key] = StoreClient(app, config, url)
        return client

    @classmethod
    def close_all(cls, state_dir: Path | None = None) -> None:
        """Close this process's store-only clients (of Apps of one state directory, or all)."""
        with cls._shared_lock:
            keys = [k for k, c in cls._shared.items() if state_dir is None or c.config.state_dir == state_dir]
            clients = [cls._shared.pop(k) for k in keys]
        for client in clients:
            if client.pid == current_pid():
                client.close()

    @property
    def closed(self) -> bool:
        return self._closed or self._gone is not None

    @property
    def pid(self) -> int:
        return self._pid

    def outstanding(self) -> int:
        with self._state:
            return sum(len(w) for w in self._waits.values()) + len(self._polls)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kick()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._shutdown(NotRunning(f"the store-only client of app {self.app.name!r} was closed"))

    def _shutdown(self, why: CapsuleError) -> None:
        """Fail what still waits, and let the connections go."""
        with self._state:
            futures = [f for waits in self._waits.values() for f in waits] + [p[0] for p in self._polls.values()]
            self._waits.clear()
            self._polls.clear()
        for fut in futures:
            _fail(fut, why)
        with self._lock:
            self._close_listener()
            self._db.close()
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            with contextlib.suppress(OSError):
                os.close(self._wake)
            self._wake = -1

    def _kick(self) -> None:
        with contextlib.suppress(OSError):
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def _tx(self, work: Callable[[], T]) -> T:
        """``work`` on the store connection, committed (its notes sent); rolled back if it fails."""
        with self._lock:
            if self._gone is not None:
                raise self._gone
            if self._closed:
                raise NotRunning(f"the store-only client of app {self.app.name!r} was closed")
            try:
                out = work()
                self._db.commit()
            except StoreUnavailable as exc:  # this client is done: App.client() makes a new one
                self._gone = exc
                if self._thread is None:
                    self._db.close()
                self._kick()
                raise
            except BaseException:
                self._db.abort()
                raise
            return out

    def _not_here(self, what: str) -> NotRunning:
        return NotRunning(
            f"{what} needs a running supervisor: no supervisor runs for state directory "
            f"{str(self.config.state_dir)!r}, so this process submits straight into the store {self.where} "
            "(submit, result, events, cancel, info and session.db work that way)"
        )

    # ---- requests ----------------------------------------------------------------------------
    def request(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Future:
        """Answer ``make(req)`` from the store: at once, or (a wait, an events poll) when it can."""
        req = next(self._reqs)
        fut: Future = concurrent.futures.Future()
        fut.req = req  # type: ignore[attr-defined]
        fut.pid = self._pid  # type: ignore[attr-defined]
        try:
            msg = make(req)
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise self._not_here(type(msg).__name__)
            handler(msg, fut)
        except Exception as exc:
            self._drop(fut)
            _fail(fut, exc)
        return fut

    def call(
        self,
        make: Callable[[int], messages.Message],
        frames: list[bytes] | None = None,
        timeout: float | None = None,
        must_run: bool = False,
    ) -> Reply:
        fut = self.request(make, frames)
        try:
            return self.wait_reply(fut, timeout)
        except concurrent.futures.TimeoutError:
            self.forget(fut)
            raise

    async def acall(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Reply:
        fut = await asyncio.to_thread(self.request, make, frames)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.forget(fut)
            raise

    def wait_reply(self, fut: Future, timeout: float | None, must_run: bool = False) -> Reply:
        return fut.result(timeout)

    async def await_reply(self, fut: Future) -> Reply:
        return await asyncio.wrap_future(fut)

    def forget(self, fut: Future) -> None:
        self._drop(fut)

    def discard(self, fut: Future) -> None:
        self._drop(fut)

    def _drop(self, fut: Future) -> None:
        req = getattr(fut, "req", None)
        with self._state:
            self._polls.pop(req, None)  # type: ignore[arg-type]
            for task_id, waits in list(self._waits.items()):
                if fut in waits:
                    waits.remove(fut)
                    if not waits:
                        del self._waits[task_id]

    def wait(self, task_id: str) -> Future:
        """Ask for a task's outcome (``Wait``)."""
        return self.request(functools.partial(wait_request, task_id))

    # ---- submits -----------------------------------------------------------------------------
    def submit(self, name: str, prepared: list[Prepared]) -> list[Submitted]:
        """Record the tasks durably (their commit); locked ones once the holder of their shard decided."""
        rows = self._rows(name, prepared)
        unlocked = [row for row in rows if row.lock_key is None]
        locked = [row for row in rows if row.lock_key is not None]
        if locked:
            self._listen()  # before the ask: its answer's note must not come unheard
        self._tx(lambda: self._db.submit(unlocked, locked, self._table))
        if not self._looked_for_members:  # once: say why nothing may run (no member, or none yet)
            self._looked_for_members = True
            if not self._tx(self._db.live_members):
                log.warning(
                    "no cluster member is live on the store %s: what this process submits waits in its pool "
                    "until one starts (`capsule-actors run MODULE:APP --store … --name NAME`; a supervisor that "
                    "is no member takes it at its next start)",
                    self.where,
                )
        done = {row.id: Submitted(row.id) for row in unlocked}
        if locked:
            done.update(self._admitted([row.id for row in locked], prepared))
        return [done[item[0]] for item, _ in prepared]

    async def asubmit(self, name: str, prepared: list[Prepared]) -> list[Submitted]:
        """``submit`` on a thread of its own: the event loop never waits for the store."""
        return await asyncio.to_thread(self.submit, name, prepared)

    def _rows(self, name: str, prepared: list[Prepared]) -> list[NewTask]:
        """The tasks to record, checked as a supervisor checks a Submit (nothing is recorded if
        one is refused)."""
        if name == FLOW_RECORD:
            raise ConfigError(
                "workflows are not submitted straight into the store: no supervisor runs for state directory "
                f"{str(self.config.state_dir)!r}; submit them through a cluster member (its state directory, "
                "CAPSULE_STATE_DIR)"
            )
        now = time.time()
        rows = []
        for item, frame in prepared:
            item_cost(item)  # routing keys over their size: ConfigError, as the Client's
            task = self.app.get_task(item[1])  # UnknownTask, in the words a supervisor uses
            if len(frame) > self.app.max_payload_bytes:
                raise SerializationError(f"payload of {len(frame)} bytes is over max_payload_bytes")
            task_id, task_name, lock_key, sid, sowner, run_at = item[:6]
            if not isinstance(task_id, str) or not 0 < len(task_id) <= 64:
                raise ProtocolError(f"submit of {task.name!r}: task id {task_id!r} is not 1..64 characters")
            priority, rate_key = item[6:8] if len(item) > 6 else (0, None)
            state = SCHEDULED if run_at and run_at > now else QUEUED
            rows.append(
                NewTask(task_id, task_name, state, lock_key, sid, sowner, frame, now, run_at, priority, rate_key)
            )
        return rows

    def _admitted(self, task_ids: list[str], prepared: list[Prepared]) -> dict[str, Submitted]:
        """Wait for the decisions on locked tasks asked of their shards' holders."""
        pending, out = list(task_ids), {}
        withdrawn: list[str] = []
        quiet_since: float | None = None
        while pending:
            generation = self._seen()
            got, live = self._tx(functools.partial(self._verdicts, list(pending)))
            for task_id, (verdict, holder) in got.items():
                if verdict in ("run", "queue"):
                    out[task_id] = Submitted(task_id)
                else:
                    out[task_id] = Submitted(holder or task_id, verdict == "join", verdict == "reject")
            pending = [t for t in pending if t not in out]
            if not pending:
                break
            if live:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > NO_MEMBER:
                gone = self._tx(functools.partial(self._db.withdraw, list(pending), self.origin))
                withdrawn += gone
                pending = [t for t in pending if t not in gone]
                quiet_since = None
                continue
            self._wait_for_note(generation, POLL)
        if withdrawn:
            raise self._withdrawn(withdrawn, prepared, out)
        return out

    def _verdicts(self, task_ids: list[str]) -> tuple[dict[str, tuple[str, str | None]], int]:
        """The decisions on these tasks that came (those on others, for other threads, are kept),
        and whether any member is live when some are still to come."""
        for task_id, verdict, holder in self._table.verdicts():
            self._decided[task_id] = (verdict, holder)
        got = {t: self._decided.pop(t) for t in task_ids if t in self._decided}
        return got, (1 if len(got) == len(task_ids) else self._db.live_members())

    def _withdrawn(self, withdrawn: list[str], prepared: list[Prepared], out: dict[str, Submitted]) -> NotRunning:
        exc = NotRunning(
            f"no cluster member was live for {NO_MEMBER:g} s to admit {len(withdrawn)} locked task(s) of "
            f"{prepared[0][0][1]!r} submitted straight into the store {self.where}; they were withdrawn (nothing "
            "recorded for them): start a member (`capsule-actors run MODULE:APP --store … --name NAME`)"
        )
        recorded = list(itertools.takewhile(lambda p: p[0][0] in out, prepared))
        if recorded:  # what was decided before (a map's first ones): their handles go on the error
            exc.add_note(f"the first {len(recorded)} tasks of this map() were recorded before the error")
            exc.submitted = [out[item[0]] for item, _ in recorded]  # type: ignore[attr-defined]
        return exc

    # ---- outcomes ----------------------------------------------------------------------------
    def _on_wait(self, msg: messages.Wait, fut: Future) -> None:
        with self._state:
            self._waits.setdefault(msg.task_id, []).append(fut)
        self._listen()  # listening before the look: an end after it is heard
        outcome = self._tx(lambda: self._db.outcome(msg.task_id))
        if outcome is None:
            raise UnknownTask(f"no task with id {msg.task_id!r} in this runtime")
        if outcome[0] not in LIVE:
            self._settle(msg.task_id, outcome)

    def _settle(self, task_id: str, outcome: tuple[TaskState, bytes | None, list[str | None]]) -> None:
        state, result, error = outcome
        reply: Reply = ([str(state.value), *error], [result or b""])
        with self._state:
            waits = self._waits.pop(task_id, [])
        for fut in waits:
            _resolve(fut, reply)

    def _look(self, task_ids: list[str] | None) -> None:
        """Answer the waits on these tasks (None: every one) that have ended."""
        with self._state:
            waited = list(self._waits) if task_ids is None else [t for t in task_ids if t in self._waits]
        if not waited:
            return
        outcomes = self._tx(lambda: {t: self._db.outcome(t) for t in self._db.ended(waited)})
        for task_id, outcome in outcomes.items():
            if outcome is not None:
                self._settle(task_id, outcome)

    # ---- events ------------------------------------------------------------------------------
    def _on_events(self, msg: messages.Events, fut: Future) -> None:
        def first() -> dict[str, Any] | None:
            if self._db.info(msg.task_id) is None:
                raise UnknownTask(f"no task with id {msg.task_id!r} in this runtime")
            return self._events(("t", msg.task_id), msg.after)

        self._poll(fut, ("t", msg.task_id), msg.after, self._tx(first))

    def _on_session_events(self, msg: messages.SessionEvents, fut: Future) -> None:
        key = ("s", msg.session_id)
        self._poll(fut, key, msg.after, self._tx(lambda: self._events(key, msg.after)))

    def _on_all_events(self, msg: messages.AllEvents, fut: Future) -> None:
        key = ("a", "")
        self._poll(fut, key, msg.after, self._tx(lambda: self._events(key, msg.after)))

    def _poll(self, fut: Future, key: PollKey, after: int, body: dict[str, Any] | None) -> None:
        """Answer now, or hold the request until there are events after ``after``."""
        if body is not None:
            _resolve(fut, (body, []))
            return
        with self._state:
            self._polls[fut.req] = (fut, key, after)  # type: ignore[attr-defined]
        self._listen()
        self._kick()

    def _events(self, key: PollKey, after: int) -> dict[str, Any] | None:
        return events_page(self._db, key, after)

    def _answer_polls(self) -> None:
        with self._state:
            polls = list(self._polls.values())
        for fut, key, after in polls:
            body = None if fut.done() else self._tx(functools.partial(self._events, key, after))
            if fut.done() or body is not None:
                with self._state:
                    self._polls.pop(fut.req, None)  # type: ignore[attr-defined]
                if body is not None:
                    _resolve(fut, (body, []))

    # ---- reading and session.db --------------------------------------------------------------
    def _on_info(self, msg: messages.Info, fut: Future) -> None:
        def read() -> list[dict[str, Any] | None]:
            found = []
            for given in msg.task_ids[:1000]:
                try:
                    found.append(self._db.info(ids.resolve(given, self._db.find_ids)))
                except UnknownTask:
                    found.append(None)
            return found

        _resolve(fut, (self._tx(read), []))

    def _on_list(self, msg: messages.ListTasks, fut: Future) -> None:
        from .states import parse

        state = parse(msg.state) if msg.state is not None else None
        if not 1 <= msg.limit <= 100_000:
            raise ConfigError(f"limit={msg.limit}: expected 1..100000")
        rows = self._tx(lambda: self._db.list_tasks(state, msg.limit))
        _resolve(fut, ([{**row, "owner": None} for row in rows], []))

    def _on_session_kv(self, msg: messages.SessionKV, fut: Future) -> None:
        """One ``session.db`` operation, as a supervisor's ``Sessions.on_session_kv`` does it."""
        check_session_kv(msg, self.app.max_payload_bytes)
        _resolve(fut, (self._tx(lambda: session_kv(self._db, msg)), []))

    # ---- cancels -----------------------------------------------------------------------------
    def _on_cancel(self, msg: messages.Cancel, fut: Future) -> None:
        _resolve(fut, (self._cancel(msg.task_id), []))

    def _cancel(self, given: str) -> bool:
        """True when the task was live and is now cancelled; False when it had ended."""
        task_id = self._tx(lambda: ids.resolve(given, self._db.find_ids))
        if self._tx(lambda: self._db.cancel_pooled(task_id)):
            return True
        held = self._tx(lambda: self._db.holder(task_id))
        if held is None:
            raise UnknownTask(f"no task with id {task_id!r} in this runtime")
        if held[0] not in LIVE:
            return False
        if held[1] is None:
            raise self._not_here(f"cancelling task {task_id} (held by a supervisor that is no cluster member)")
        self._listen()
        self._tx(lambda: self._table.ask_cancel(task_id))
        quiet_since: float | None = None
        while True:
            generation = self._seen()
            answer = self._cancel_answer(task_id)
            if answer is not None:
                return answer
            if self._tx(lambda: self._db.cancel_pooled(task_id)):  # its holder was lost: back in the pool
                self._tx(lambda: self._table.drop_cancel(task_id))
                return True
            held = self._tx(lambda: self._db.holder(task_id))
            if held is None or held[0] not in LIVE:  # ended: by our cancel (its answer came with it), or not
                answer = self._cancel_answer(task_id)
                self._tx(lambda: self._table.drop_cancel(task_id))
                return bool(answer)
            if self._tx(self._db.live_members):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > NO_MEMBER:
                self._tx(lambda: self._table.drop_cancel(task_id))
                raise NotRunning(
                    f"no cluster member was live for {NO_MEMBER:g} s to cancel task {task_id} (held by member "
                    f"{held[1]}): nothing was changed; it is cancelled, or runs, when a member takes it over"
                )
            self._wait_for_note(generation, POLL)

    def _cancel_answer(self, task_id: str) -> bool | None:
        def read() -> bool | None:
            for answered, cancelled in self._table.cancel_answers():
                self._answers[answered] = cancelled
            return self._answers.pop(task_id, None)

        return self._tx(read)

    # ---- notifications -----------------------------------------------------------------------
    def _seen(self) -> int:
        with self._changed:
            return self._generation

    def _wait_for_note(self, generation: int, timeout: float) -> None:
        """Until a note says an answer for us came (after ``generation``), or ``timeout``."""
        with self._changed:
            if self._generation == generation:
                self._changed.wait(timeout)

    def _listen(self) -> None:
        """LISTEN (on this thread: when it returns, what members say next is heard) and start
        the thread that reads notes and polls; once."""
        if self._thread is not None:
            return
        with self._start:
            if self._thread is not None:
                return
            self._relisten()
            thread = threading.Thread(target=self._run, name="capsule-store-client", daemon=True)
            thread.start()
            self._thread = thread

    def _relisten(self) -> None:
        from .store.postgres import listener

        try:
            self._listener = listener(self._db)
        except Exception as exc:  # the polls still find everything
            log.warning("cannot LISTEN on the store %s (%s): polling every %.1f s", self.where, exc, POLL)
            self._listener = None

    def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _run(self) -> None:
        """The thread: notes as they come, and every POLL (EVENT_POLL while events are awaited)
        a look at what is still outstanding."""
        next_look = time.monotonic() + POLL
        while not self._closed and self._gone is None:
            conn = self._listener
            try:
                fds = [self._wake] + ([conn.fileno()] if conn is not None else [])
                ready, _, _ = select.select(fds, [], [], max(0.0, next_look - time.monotonic()))
            except Exception:  # a listener closed meanwhile: the next turn goes without it
                time.sleep(0.05)
                ready = []
            if self._closed or self._gone is not None:
                break
            try:
                next_look = self._turn(conn, ready, next_look)
            except StoreUnavailable:
                break
            except Exception:
                if self._closed:
                    break
                log.exception("the store-only client's look at the store failed; trying again in %.1f s", POLL)
                next_look = time.monotonic() + POLL
        if self._gone is not None and not self._closed:  # the store stayed away: this client is done
            self._closed = True
            self._shutdown(self._gone)

    def _turn(self, conn: Any, ready: list[int], next_look: float) -> float:
        """What a wake-up brought: notes, and (when it is time, or a new poll kicked) a look at
        every outstanding wait and poll; returns when to look next."""
        kicked = self._wake in ready
        if kicked:
            with contextlib.suppress(OSError):
                os.eventfd_read(self._wake)
        if conn is not None and conn.fileno() in ready:
            ended = self._notes(conn)
            if ended:
                self._look(ended)
        if time.monotonic() < next_look and not kicked:
            return next_look
        self._look(None)
        self._answer_polls()
        if self._listener is None:
            self._relisten()
        with self._state:
            polling = bool(self._polls)
        return time.monotonic() + (EVENT_POLL if polling else POLL)

    def _notes(self, conn: Any) -> list[str]:
        """The ids of the ``done`` notes received; a note for us wakes the answers' waiters."""
        from .store.postgres import notes

        try:
            payloads = notes(conn)
        except Exception as exc:
            log.warning("lost the LISTEN connection to %s (%s): polling until it is back", self.where, exc)
            self._close_listener()
            return []
        ours = (f"verdict {self.origin}", f"cancelled {self.origin}")
        if any(payload in ours for payload in payloads):
            with self._changed:
                self._generation += 1
                self._changed.notify_all()
        return [task_id for payload in payloads if payload.startswith("done ") for task_id in payload[5:].split()]
