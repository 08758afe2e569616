"""What app code holds after a submit: TaskHandle, and the records it returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import errors, messages
from .errors import RemoteTraceback, SerializationError, TaskCancelled, TaskFailed
from .lifecycle import current_pid
from .states import TaskState

if TYPE_CHECKING:
    from .client import AppClient, ClientSource, Submitted


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A snapshot of one task's record in the store."""

    id: str
    name: str
    state: TaskState
    attempts: int
    lock_key: str | None
    session_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: tuple[str, str] | None
    progress: float | None
    slot: str | None = None
    rate_limited_until: float | None = None  # QUEUED, held back by its rate limit until then (epoch s)

    @property
    def waiting_for(self) -> str | None:
        """Why a queued task has not started, when a limit holds it: "rate limited until 12:00:03"."""
        if self.rate_limited_until is None or self.state is not TaskState.QUEUED:
            return None
        return f"rate limited until {time.strftime('%H:%M:%S', time.localtime(self.rate_limited_until))}"

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> TaskInfo:
        error = (rec["error_type"], rec["error_message"] or "") if rec.get("error_type") else None
        return cls(
            id=rec["id"],
            name=rec["name"],
            state=TaskState(rec["state"]),
            attempts=rec["attempts"],
            lock_key=rec["lock_key"],
            session_id=rec["session_id"],
            created_at=rec["created_at"],
            started_at=rec["started_at"],
            finished_at=rec["finished_at"],
            error=error,
            progress=rec["progress"],
            slot=rec.get("slot"),
            rate_limited_until=rec.get("rate_limited_until"),
        )


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """One thing that happened to a task: a state change, or (with a session) a reply, notify..."""

    seq: int
    task_id: str
    kind: str
    data: dict[str, Any]
    ts: float
    session_id: str | None = None


_ERRORS_BY_NAME = {
    "TaskCancelled": errors.TaskCancelled,
    "WorkerCrashed": errors.WorkerCrashed,
    "TaskTimeout": errors.TaskTimeout,
    "LockConflict": errors.LockConflict,  # a workflow step its key's owner refused (on_conflict="reject")
}


def outcome_value(body: list[Any], frames: list[bytes]) -> Any:
    """The value of a terminal task (a Wait's answer), or raise what its result() promises."""
    outcome = messages.Outcome.from_wire(body)
    state, etype, emsg, tb = outcome.state, outcome.error_type, outcome.error_message, outcome.traceback
    frame = frames[0] if frames else b""
    if state == TaskState.SUCCEEDED:
        try:
            return cloudpickle.loads(frame)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle the task's result: {exc!r}") from exc
    if state == TaskState.CANCELLED:
        raise TaskCancelled(emsg or "task was cancelled")
    if etype in _ERRORS_BY_NAME and not frame:
        raise _ERRORS_BY_NAME[etype](emsg or etype)
    error: BaseException | None = None
    if frame:
        try:
            loaded = cloudpickle.loads(frame)
            error = loaded if isinstance(loaded, BaseException) else None
        except Exception:
            error = None
    if error is None:
        raise TaskFailed(f"{etype}: {emsg}", etype or "", tb or "")
    error.remote_traceback = tb  # type: ignore[attr-defined]
    raise error from RemoteTraceback(tb or "")


class TaskHandle:
    """A reference to one submitted task; safe to pass between threads and processes."""

    __slots__ = ("_ack", "_app", "_final", "_push", "deduplicated", "id", "lock_key", "name")

    def __init__(
        self, app: ClientSource, task_id: str, name: str, lock_key: str | None = None, deduplicated: bool = False
    ) -> None:
        self.id = task_id
        self.name = name
        self.lock_key = lock_key
        self.deduplicated = deduplicated
        self._app = app
        self._final: tuple[list[Any], list[bytes]] | None = None
        # the reply the supervisor pushes the outcome to (set by submit; not in other processes)
        self._push: concurrent.futures.Future[Any] | None = None
        # a journaled submit's ack (future, item index), until it is taken: see _settle
        self._ack: tuple[concurrent.futures.Future[Any], int] | None = None

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name} {self.id}>"

    def __reduce__(self) -> Any:
        return (TaskHandle, (self._app, self.id, self.name, self.lock_key, self.deduplicated))

    @classmethod
    def from_id(cls, app: ClientSource, task_id: str) -> TaskHandle:
        """Re-attach to a task by id, from any process that can reach the runtime."""
        info = cls(app, task_id, "").info()
        return cls(app, info.id, info.name, info.lock_key)  # a short id (ids.resolve) becomes the full one

    @classmethod
    def _submitted(cls, app: ClientSource, name: str, lock_key: str | None, sub: Submitted) -> TaskHandle:
        """The handle of a task this process just submitted (holding its push and journaled ack)."""
        handle = cls(app, sub.task_id, name, lock_key, sub.deduplicated)
        handle._push, handle._ack = sub.push, sub.ack
        return handle

    @property
    def _client(self) -> AppClient:
        return self._app.client()

    # ---- state -------------------------------------------------------------------------------
    def info(self) -> TaskInfo:
        body, _ = self._client.call(lambda req: messages.Info(req, [self.id]))
        if not body or body[0] is None:
            raise errors.UnknownTask(f"no task with id {self.id!r} in this runtime")
        return TaskInfo.from_record(body[0])

    def status(self) -> TaskState:
        return self.info().state

    def done(self) -> bool:
        return self._final is not None or self.status().terminal

    def cancel(self) -> bool:
        """Cancel the task; False when it had already finished."""
        body, _ = self._client.call(lambda req: messages.Cancel(req, self.id))
        return bool(body)

    async def acancel(self) -> bool:
        body, _ = await self._client.acall(lambda req: messages.Cancel(req, self.id))
        return bool(body)

    # ---- results -----------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        """Block until the task ends; return its value or raise its error.

        Raises the builtin TimeoutError when ``timeout`` passes first (the task goes on).
        """
        if self._final is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                self._settle(timeout)
                push = self._pushed()
                fut = push or self._client.wait(self.id)
                try:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._final = self._client.wait_reply(fut, left)
                except concurrent.futures.TimeoutError:
                    if push is None:  # a pushed outcome stays expected: a later result() gets it
                        self._client.forget(fut)
                    raise
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"task {self.id} did not finish within {timeout} s") from None
        return outcome_value(*self._final)

    def _settle(self, timeout: float | None) -> None:
        """Take a journaled submit's ack: raise the supervisor's refusal (the submit's error),
        and learn whether the outcome will be pushed (not for a task held in the store only)."""
        pending = self._live_ack()
        if pending is not None:
            body, _ = self._client.wait_reply(pending[0], timeout)
            self._take_ack(body, pending[1])

    async def _asettle(self) -> None:
        pending = self._live_ack()
        if pending is not None:
            body, _ = await self._client.await_reply(pending[0])
            self._take_ack(body, pending[1])

    def _live_ack(self) -> tuple[concurrent.futures.Future[Any], int] | None:
        """The journaled ack still to take, if this process can wait for it; in a forked child,
        or after its connection closed, drop it (and the push): the outcome is asked with a Wait."""
        if self._ack is not None:
            ack = self._ack[0]
            if ack.pid == current_pid() and not (ack.done() and ack.exception() is not None):  # type: ignore[attr-defined]
                return self._ack
            self._ack = self._push = None
        return None

    def _take_ack(self, body: dict[str, Any], i: int) -> None:
        self._ack = None
        if not messages.SubmitAck.item_of(body, i).pushed:
            self._push = None

    def _pushed(self) -> concurrent.futures.Future[Any] | None:
        """The future the outcome is pushed to, unless its connection was closed since or this is
        a forked child (then the current connection is asked with a Wait)."""
        push = self._push
        if push is not None and (
            push.pid != current_pid()  # type: ignore[attr-defined]
            or (push.done() and push.exception() is not None)
        ):
            self._push = push = None
        return push

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await_result().__await__()

    async def _await_result(self) -> Any:
        if self._final is None:
            await self._asettle()
            push = self._pushed()
            if push is not None:
                self._final = await self._client.await_reply(push)
            else:
                self._final = await self._client.acall(lambda req: messages.Wait(req, self.id))
        return outcome_value(*self._final)

    # ---- events ------------------------------------------------------------------------------
    def events(self, after: int = 0) -> TaskEventStream:
        """Events of this task from seq ``after`` on, until it ends (sync or async iteration)."""
        return TaskEventStream(self, after)


class TaskEventStream:
    """Iterates a task's events (long-polling the supervisor) and stops after its terminal state."""

    def __init__(self, handle: TaskHandle, after: int) -> None:
        self._handle = handle
        self.cursor = after

    @staticmethod
    def _batch(body: dict[str, Any]) -> tuple[list[TaskEvent], bool]:
        return [TaskEvent(**e) for e in body["events"]], bool(body["terminal"]) and not body["more"]

    def __iter__(self) -> Iterator[TaskEvent]:
        client = self._handle._client
        while True:
            body, _ = client.call(lambda req: messages.Events(req, self._handle.id, self.cursor))
            events, last = self._batch(body)
            for event in events:
                self.cursor = event.seq  # the last event handed out: resuming from it loses nothing
                yield event
            if last:
                return

    async def __aiter__(self) -> AsyncIterator[TaskEvent]:
        client = self._handle._client
        while True:
            body, _ = await client.acall(lambda req: messages.Events(req, self._handle.id, self.cursor))
            events, last = self._batch(body)
            for event in events:
                self.cursor = event.seq
                yield event
            if last:
                return


class SessionSubscription:
    """Every event of one session, as it happens (long-polling); ``cursor`` is the last seq seen.

    Iterates until the caller breaks out: a chat loop resumes later with
    ``app.subscribe(session_id, after=cursor)``, missing nothing that is still retained. With
    ``timeout``, an iteration that lasts longer raises the builtin TimeoutError (so a test, or a
    loop with its own deadline, is bounded).
    """

    def __init__(self, app: ClientSource, session_id: str, after: int, timeout: float | None = None) -> None:
        self._app = app
        self.session_id = session_id
        self.cursor = after
        self.timeout = timeout

    def _request(self, req: int) -> messages.Message:
        return messages.SessionEvents(req, self.session_id, self.cursor)

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(f"no more events of session {self.session_id!r} within {self.timeout} s")

    async def __aiter__(self) -> AsyncIterator[TaskEvent]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            client = self._app.client()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                body, _ = await asyncio.wait_for(client.acall(self._request), left)
            except TimeoutError:  # acall forgot its request on the cancel
                raise self._timed_out() from None
            for e in body["events"]:
                self.cursor = e["seq"]  # the last event handed out: resuming from it loses nothing
                yield TaskEvent(**e)

    def __iter__(self) -> Iterator[TaskEvent]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            client = self._app.client()
            fut = client.request(self._request)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                body, _ = client.wait_reply(fut, left)
            except concurrent.futures.TimeoutError:
                client.forget(fut)
                raise self._timed_out() from None
            for e in body["events"]:
                self.cursor = e["seq"]
                yield TaskEvent(**e)


def wait_all(handles: list[TaskHandle], timeout: float | None = None) -> list[Any]:
    """Results of many handles, in order, with their waits pipelined: one request per task
    goes out at once, so N results cost about one round trip instead of N.

    Raises the first failed task's error (like ``result()``), or TimeoutError past ``timeout``.
    """
    pending = [h for h in handles if h._final is None]
    if pending:
        client = pending[0]._client
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for h in pending:
                h._settle(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"the submits of {len(pending)} tasks were not acknowledged within {timeout} s"
            ) from None
        futures = [(h, h._pushed() or client.wait(h.id)) for h in pending]
        try:
            for h, fut in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                h._final = client.wait_reply(fut, left)
        except concurrent.futures.TimeoutError:
            for h, fut in futures:
                if h._final is None and fut is not h._push:
                    client.forget(fut)
            raise TimeoutError(
                f"{sum(h._final is None for h in pending)} tasks did not finish within {timeout} s"
            ) from None
    return [h.result() for h in handles]


async def await_all(handles: list[TaskHandle]) -> list[Any]:
    """``wait_all`` for asyncio: every wait is in flight at once."""
    return list(await asyncio.gather(*handles))
