"""The supervisor's answers to client requests: each request type has one handler here, which
does what it can itself and hands the rest to the part that owns it (a Submit to ``Intake``, a
wait to ``Waiters``, session.db to ``Sessions``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import ids, messages, states
from ..errors import (
    CapsuleError,
    CapsuleInternalError,
    ConfigError,
    Fenced,
    ProtocolError,
    StoreUnavailable,
    UnknownTask,
)
from ..flows import FLOW_TASK
from ..ids import new_task_id
from ..states import QUEUED, RUNNING, SCHEDULED
from .intake import NO_ARGS
from .tasks import PendingSubmit

if TYPE_CHECKING:
    from ..app import App
    from ..store import TaskStore
    from .attempts import Attempts
    from .cluster import Membership
    from .intake import Intake
    from .keys import KeyRouting
    from .limits import Limits
    from .outbox import Frames, Outbox
    from .sessions import Sessions
    from .status import StatusReport
    from .tasks import TaskTable
    from .waiters import Waiters

log = logging.getLogger("capsule_actors.supervisor")


def unknown(task_id: str) -> CapsuleError:
    return UnknownTask(f"no task with id {task_id!r} in this runtime")


class ClientRequests:
    """Decodes a client's message and calls its handler; an error becomes the error reply."""

    def __init__(
        self,
        app: App,
        store: TaskStore,
        tasks: TaskTable,
        intake: Intake,
        attempts: Attempts,
        keys: KeyRouting,
        limits: Limits,
        waiters: Waiters,
        sessions: Sessions,
        status: StatusReport,
        outbox: Outbox,
        cluster: Membership | None = None,
    ) -> None:
        self._app = app
        self._cluster = cluster
        self._limits = limits
        self._store = store
        self._tasks = tasks
        self._intake = intake
        self._attempts = attempts
        self._keys = keys
        self._waiters = waiters
        self._status = status
        self._outbox = outbox
        self.handlers: dict[type, Callable[[bytes, Any, Frames], None]] = {
            messages.Submit: intake.on_submit,
            messages.Wait: self.on_wait,
            messages.Forget: self.on_forget,
            messages.Info: self.on_info,
            messages.Cancel: self.on_cancel,
            messages.ListTasks: self.on_list,
            messages.Status: self.on_status,
            messages.Events: self.on_events,
            messages.SessionEvents: self.on_session_events,
            messages.AllEvents: self.on_all_events,
            messages.Retry: self.on_retry,
            messages.SessionKV: sessions.on_session_kv,
            messages.ShowCard: sessions.on_show_card,
            messages.InjectCrash: self.on_inject_crash,
        }

    def on_message(self, frames: Frames) -> None:
        if len(frames) < 2:
            raise ProtocolError("client message without a header frame")
        ident, payload = frames[0], frames[2:]
        try:
            msg = messages.decode(frames[1])
        except ProtocolError as exc:  # answered when it says which request it is: e.g. another version
            req = messages.request_id(frames[1], self.handlers)
            if req is not None:
                why = f"the supervisor cannot read this request: {exc}; {messages.version_hint()}"
                self._outbox.error(ident, req, ProtocolError(why))
            raise
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{type(msg).__name__} is not a client request")
        if type(msg) is not messages.Submit:  # it may ask about a task submitted just before it
            self._intake.flush()
        try:
            handler(ident, msg, payload)
        except (StoreUnavailable, Fenced):  # not this request's fault: the supervisor stops, unanswered
            raise
        except CapsuleError as exc:
            self._outbox.error(ident, msg.req, exc)  # type: ignore[attr-defined]
        except Exception as exc:
            self._outbox.error(ident, msg.req, CapsuleInternalError(f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
            raise

    def on_wait(self, ident: bytes, msg: messages.Wait, payload: Frames) -> None:
        if msg.task_id in self._tasks:
            self._waiters.wait(msg.task_id, ident, msg.req)
            return
        outcome = self._store.outcome(msg.task_id)
        if outcome is None:
            raise unknown(msg.task_id)
        state, result, error = outcome
        if state in (SCHEDULED, QUEUED, RUNNING):  # delayed, in the backlog, or held by another cluster member
            self._waiters.wait(msg.task_id, ident, msg.req)
            return
        self._outbox.reply(ident, msg.req, True, messages.Outcome(state, *error).to_wire(), [result or b""])

    def on_forget(self, ident: bytes, msg: messages.Forget, payload: Frames) -> None:
        self._waiters.forget(ident, msg.req)

    def _full_id(self, given: str) -> str:
        """A task id as a user gave it: the full id, or an ending of it (``ids.resolve``)."""
        return ids.resolve(given, self._store.find_ids)

    def _info(self, given: str) -> dict[str, Any] | None:
        try:
            record = self._store.info(self._full_id(given))
        except UnknownTask:
            return None
        if record is not None and record["id"] in self._limits.rate_limited_until:
            # held back by its rate limit (known in memory only: see limits.py)
            record["rate_limited_until"] = self._limits.rate_limited_until[record["id"]]
        return record

    def on_info(self, ident: bytes, msg: messages.Info, payload: Frames) -> None:
        self._outbox.reply(ident, msg.req, True, [self._info(tid) for tid in msg.task_ids[:1000]])

    def on_cancel(self, ident: bytes, msg: messages.Cancel, payload: Frames) -> None:
        task_id = self._full_id(msg.task_id)
        task = self._intake.load_stored(task_id)
        if task is None:
            info = self._store.info(task_id)
            if info is None:
                raise unknown(task_id)
            if self._cluster is not None and info["state"] in states.LIVE:  # held by another member
                self._cluster.cancel_elsewhere(task_id, ident, msg.req)
                return
            self._outbox.reply(ident, msg.req, True, False)
            return
        self._attempts.cancel(task)
        self._outbox.reply(ident, msg.req, True, True)

    def on_list(self, ident: bytes, msg: messages.ListTasks, payload: Frames) -> None:
        state = states.parse(msg.state) if msg.state is not None else None
        if not 1 <= msg.limit <= 100_000:
            raise ConfigError(f"limit={msg.limit}: expected 1..100000")
        rows = self._store.list_tasks(state, msg.limit)
        for row in rows:
            key, name = row["lock_key"], row["name"]
            row["owner"] = self._keys.owner_of(name, key) if key is not None and name in self._app.tasks else None
        self._outbox.reply(ident, msg.req, True, rows)

    def on_status(self, ident: bytes, msg: messages.Status, payload: Frames) -> None:
        self._outbox.reply(ident, msg.req, True, self._status.snapshot().to_wire())

    def on_events(self, ident: bytes, msg: messages.Events, payload: Frames) -> None:
        if msg.task_id not in self._tasks and self._store.info(msg.task_id) is None:
            raise unknown(msg.task_id)
        self._waiters.poll(ident, msg.req, ("t", msg.task_id), msg.after)

    def on_session_events(self, ident: bytes, msg: messages.SessionEvents, payload: Frames) -> None:
        self._waiters.poll(ident, msg.req, ("s", msg.session_id), msg.after)

    def on_all_events(self, ident: bytes, msg: messages.AllEvents, payload: Frames) -> None:
        self._waiters.poll(ident, msg.req, ("a", ""), msg.after)

    def on_retry(self, ident: bytes, msg: messages.Retry, payload: Frames) -> None:
        task_id = self._full_id(msg.task_id)
        row = self._store.retry_row(task_id)
        if row is None:
            raise unknown(task_id)
        name, state, lock_key, sid, sowner, args, priority, rate_key, retried_as = row
        if not states.TaskState(state).terminal:
            raise ConfigError(f"task {task_id} is {state}: only a finished task can be retried")
        if name == FLOW_TASK:
            raise ConfigError(f"{task_id} is a workflow: submit the workflow again (its failed steps can be retried)")
        if retried_as is not None:
            raise ConfigError(f"task {task_id} was retried already, as {retried_as}: retry that one if it failed")
        self._app.get_task(name)
        self._intake.refuse_if_full()
        new_id = new_task_id()
        item = [new_id, name, lock_key, sid, sowner, None, priority, rate_key]
        self._intake.submit(PendingSubmit(ident, msg.req, 1), [item], [bytes(args or NO_ARGS)])
        self._store.mark_retried(task_id, sid, new_id)  # the new task is named in the old one's record
        if new_id in self._tasks or self._store.exists(new_id):  # recorded (a locked one: once admitted)
            self._store.add_event(new_id, sid, "retried", {"retry_of": task_id})  # and its origin in its events

    def on_inject_crash(self, ident: bytes, msg: messages.InjectCrash, payload: Frames) -> None:
        self._app.get_task(msg.name)
        self._attempts.crash_plan.setdefault(msg.name, set()).add(msg.attempt)
        self._outbox.reply(ident, msg.req, True, True)
