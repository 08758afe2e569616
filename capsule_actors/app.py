"""App and the task decorator: the registry of task specs that travels to every process."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import inspect
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import cloudpickle

from . import bootstrap, tracing
from .errors import CapsuleError, ConfigError, LockConflict, SerializationError
from .flows import FLOW_TASK, Signature, flow_record
from .handle import SessionSubscription, TaskHandle
from .ids import new_task_id
from .lifecycle import current_pid
from .limits import RateLimit, check_concurrency, check_priority, key_fields
from .schedules import ScheduleSpec
from .session import DEFAULT_OWNER_ID, Session, bound_session

if TYPE_CHECKING:
    from .bootstrap import ClientConfig
    from .client import AppClient, Prepared, Submitted
    from .runtime import Runtime

P = ParamSpec("P")
R = TypeVar("R")

ON_CONFLICT = ("join", "queue", "reject")
FAILURE_HOOK = "capsule.on_failure"  # the task that runs an App's @on_failure hook
DEFAULT_MAX_PAYLOAD = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): min(max, initial * factor**(n-1)); with ``jitter`` the
    delay is drawn uniformly from [delay/2, delay] ("equal jitter") so retries spread out."""

    initial: float = 0.5
    factor: float = 2.0
    max: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial < 0 or self.factor < 1 or self.max < 0:
            raise ConfigError(
                f"Backoff(initial={self.initial}, factor={self.factor}, max={self.max}): "
                "initial and max must be >= 0 and factor >= 1"
            )

    def delay(self, retry: int) -> float:
        base = min(self.max, self.initial * self.factor ** max(0, retry - 1))
        return random.uniform(base / 2, base) if self.jitter else base


class Task(Generic[P, R]):
    """A function registered with an App; call it directly or send it with submit()."""

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        *,
        name: str | None,
        lock: str | None,
        on_conflict: str,
        retries: int,
        backoff: Backoff | None,
        retry_on: tuple[type[BaseException], ...] | None,
        timeout: float | None,
        process: bool,
        priority: int = 0,
        rate_limit: str | RateLimit | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name or fn.__name__
        self.signature = inspect.signature(fn)
        self.accepts_session = "session" in self.signature.parameters
        # a `session` parameter without a default: every submit must bind one (``prepare``)
        self.needs_session = (
            self.accepts_session and self.signature.parameters["session"].default is inspect.Parameter.empty
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.lock = lock
        self.on_conflict = on_conflict
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.retry_on = retry_on
        self.timeout = timeout
        self.process = process
        where = f"task {self.name!r}"
        self.priority = check_priority(priority, where)
        self.rate_limit = RateLimit.of(rate_limit, where)
        self.concurrency = check_concurrency(concurrency, where)
        self._lock_fields = key_fields(lock, "lock") if isinstance(lock, str) else []
        self._rate_fields = (
            key_fields(self.rate_limit.key, "rate_limit key") if self.rate_limit and self.rate_limit.key else []
        )
        self._validate()
        functools.update_wrapper(self, fn)  # type: ignore[arg-type, unused-ignore]

    def _validate(self) -> None:
        where = f"task {self.name!r}"
        if self.on_conflict not in ON_CONFLICT:
            raise ConfigError(f"{where}: on_conflict={self.on_conflict!r}, expected one of {ON_CONFLICT}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError(f"{where}: retries={self.retries!r}, expected an int >= 0")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"{where}: timeout={self.timeout!r}, expected seconds > 0 or None")
        if self.retry_on is not None and not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on
        ):
            raise ConfigError(f"{where}: retry_on={self.retry_on!r}, expected a tuple of exception types")
        if self.lock is not None and (not isinstance(self.lock, str) or not self.lock):
            raise ConfigError(f"{where}: lock={self.lock!r}, expected a non-empty string template")
        for what, template, fields in (
            ("lock", self.lock, self._lock_fields),
            ("rate_limit key", self.rate_limit.key if self.rate_limit else None, self._rate_fields),
        ):
            for field in fields:
                if field not in self.signature.parameters or field == "session":
                    raise ConfigError(
                        f"{where}: {what} template {template!r} names {{{field}}}, which is not a "
                        f"parameter of {self.fn.__name__}{self.signature}"
                    )

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def retryable(self, exc_type: type[BaseException]) -> bool:
        from .errors import TaskCancelled

        if issubclass(exc_type, TaskCancelled):
            return False
        return self.retry_on is None or issubclass(exc_type, self.retry_on)

    # ---- preparing a submit ------------------------------------------------------------------
    def lock_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self._format_key("lock", self.lock, self._lock_fields, args, kwargs)

    def key_parameters(self) -> dict[str, tuple[str | None, list[str]]]:
        """Each key of this task (``lock``, ``rate_limit key``): its template and the parameters
        it is formatted from (a workflow step's keys must not need the input it is given)."""
        rate = self.rate_limit.key if self.rate_limit else None
        return {"lock": (self.lock, list(self._lock_fields)), "rate_limit key": (rate, list(self._rate_fields))}

    def rate_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The budget a submit counts against: its formatted key, or None (one budget for the
        task, or no rate limit)."""
        key = self.rate_limit.key if self.rate_limit else None
        return self._format_key("rate_limit key", key, self._rate_fields, args, kwargs)

    def _format_key(
        self, what: str, template: str | None, fields: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str | None:
        if template is None:
            return None
        if not fields:
            return template  # a constant key
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"task {self.name!r}: arguments do not fit {self.signature}: {exc}") from None
        bound.apply_defaults()
        try:
            return template.format(**bound.arguments)
        except (KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(f"task {self.name!r}: {what} template {template!r} needs {exc}") from None

    def prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        session: Session | None,
        run_at: float | None,
        priority: int | None = None,
        injected: tuple[Any, ...] = (),
    ) -> tuple[list[Any], bytes]:
        """Validate and serialize one submit: (header item, payload). Raises before anything is sent.
        ``injected``: stand-ins for the inputs a workflow step is given first (not in its payload);
        its keys are formatted over them and ``args`` (``flows._Compiler`` checks that no key
        names them)."""
        if session is not None and not isinstance(session, Session):
            raise ConfigError(f"session={session!r}: expected a capsule_actors.Session or None")
        if session is None and self.needs_session:
            raise ConfigError(
                f"task {self.name!r} declares the parameter 'session' without a default: submit it with "
                "session=cpsl.Session(ID), or declare `session: cpsl.Session | None = None`"
            )
        lock_key = self.lock_key((*injected, *args), kwargs)
        rate_key = self.rate_key((*injected, *args), kwargs)
        try:
            payload = cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"task {self.name!r}: its arguments cannot be pickled with cloudpickle: {exc!r}"
            ) from exc
        limit = self.app.max_payload_bytes
        if len(payload) > limit:
            raise SerializationError(
                f"task {self.name!r}: arguments are {len(payload)} bytes pickled, over "
                f"max_payload_bytes={limit}; pass a reference (path, key) instead of the data"
            )
        item = [
            new_task_id(),
            self.name,
            lock_key,
            session.id if session else None,
            session.owner if session else None,
            run_at,
            self.priority if priority is None else priority,
            rate_key,
        ]
        trace = tracing.traceparent()  # the caller's span, when the app traces (OpenTelemetry)
        if trace is not None:
            item.append(trace)
        return item, payload

    def _handles(self, prepared: list[Prepared], submitted: list[Submitted]) -> list[TaskHandle]:
        """Handles of submitted tasks; a conflict (on_conflict="reject" and the key is held)
        raises LockConflict, with the handles of the others on it."""
        handles, conflict = [], None
        for (item, _), sub in zip(prepared, submitted):
            if not sub.conflict:
                handles.append(TaskHandle._submitted(self.app, self.name, item[2], sub))
            elif conflict is None:
                conflict = (item[2], sub.task_id)
        if conflict is not None:
            key, holder = conflict
            exc = LockConflict(
                f"task {self.name!r}: lock key {key!r} is held by live task {holder} (on_conflict='reject')"
            )
            exc.handles = handles  # type: ignore[attr-defined]
            exc.holder_id = holder  # type: ignore[attr-defined]
            raise exc
        return handles

    def _recorded(self, exc: CapsuleError, prepared: list[Prepared]) -> None:
        """A map() failed after its first messages were recorded: their handles go on the error."""
        submitted: list[Submitted] | None = getattr(exc, "submitted", None)
        if submitted:
            try:
                exc.handles = self._handles(prepared, submitted)  # type: ignore[attr-defined]
            except LockConflict as conflict:
                exc.handles = conflict.handles  # type: ignore[attr-defined]

    def _send(self, prepared: list[Prepared]) -> list[TaskHandle]:
        try:
            submitted = self.app.client().submit(self.name, prepared)
        except CapsuleError as exc:
            self._recorded(exc, prepared)
            raise
        return self._handles(prepared, submitted)

    async def _asend(self, prepared: list[Prepared]) -> list[TaskHandle]:
        try:
            submitted = await self.app.client().asubmit(self.name, prepared)
        except CapsuleError as exc:
            self._recorded(exc, prepared)
            raise
        return self._handles(prepared, submitted)

    # ---- submitting --------------------------------------------------------------------------
    def options(
        self,
        *,
        priority: int | None = None,
        session: Session | None = None,
        delay: float | None = None,
        at: _dt.datetime | None = None,
    ) -> TaskOptions:
        """Options for one call (``.submit``, ``.asubmit``, ``.map``, ``.schedule``…) that never
        clash with the task's own keyword arguments: ``task.options(priority=9).submit(...)``."""
        return TaskOptions(self, priority, session, delay, at)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this call, as a step of ``cpsl.chain``, ``group`` or ``chord``."""
        return Signature(self, args, kwargs)

    def submit(self, *args: Any, session: Session | None = None, **kwargs: Any) -> TaskHandle:
        """Record the task durably and return its handle (after the supervisor's commit)."""
        return self._send([self.prepare(args, kwargs, session, None)])[0]

    async def asubmit(self, *args: Any, session: Session | None = None, **kwargs: Any) -> TaskHandle:
        """submit() without blocking the event loop."""
        return (await self._asend([self.prepare(args, kwargs, session, None)]))[0]

    def schedule(
        self,
        *args: Any,
        delay: float | None = None,
        at: _dt.datetime | None = None,
        session: Session | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        """Submit to run after ``delay`` seconds or at ``at``; the handle starts SCHEDULED."""
        return self._send([self.prepare(args, kwargs, session, _run_at(delay, at))])[0]

    async def aschedule(
        self,
        *args: Any,
        delay: float | None = None,
        at: _dt.datetime | None = None,
        session: Session | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        return (await self._asend([self.prepare(args, kwargs, session, _run_at(delay, at))]))[0]

    def map(self, arg_list: Iterable[Any], session: Session | None = None) -> list[TaskHandle]:
        """Submit many in one durable batch. Each item is a tuple of positional arguments, a
        dict of keyword arguments, or a single argument."""
        prepared = [self.prepare(*_split(item), session, None) for item in arg_list]
        return self._send(prepared) if prepared else []

    async def amap(self, arg_list: Iterable[Any], session: Session | None = None) -> list[TaskHandle]:
        prepared = [self.prepare(*_split(item), session, None) for item in arg_list]
        return await self._asend(prepared) if prepared else []


class TaskOptions:
    """One call's options, apart from the task's own keyword arguments (a task may well have a
    parameter named ``priority`` or ``delay``): ``task.options(priority=5).submit(x, delay=3)``
    passes ``delay=3`` to the task. ``delay``/``at`` make every submit a delayed one."""

    def __init__(
        self,
        task: Task[Any, Any],
        priority: int | None,
        session: Session | None,
        delay: float | None,
        at: _dt.datetime | None,
    ) -> None:
        self.task = task
        self.priority = None if priority is None else check_priority(priority, f"task {task.name!r} options()")
        self.session = session
        self._delay, self._at = delay, at
        if delay is not None or at is not None:
            _run_at(delay, at)  # a bad delay or at fails here, at options()

    def __repr__(self) -> str:
        return f"<TaskOptions {self.task.name} priority={self.priority} delay={self._delay} at={self._at}>"

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
        run_at = None if self._delay is None and self._at is None else _run_at(self._delay, self._at)
        return self.task.prepare(args, kwargs, self.session, run_at, self.priority)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A workflow step with these options (priority, session; a step cannot be delayed)."""
        if self._delay is not None or self._at is not None:
            raise ConfigError(
                f"task {self.task.name!r}: options(delay=/at=).s(): a workflow step starts when its inputs are in"
            )
        return Signature(self.task, args, kwargs, self.priority, self.session)

    def submit(self, *args: Any, **kwargs: Any) -> TaskHandle:
        return self.task._send([self._prepare(args, kwargs)])[0]

    async def asubmit(self, *args: Any, **kwargs: Any) -> TaskHandle:
        return (await self.task._asend([self._prepare(args, kwargs)]))[0]

    def schedule(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """submit(), for a TaskOptions made with delay= or at= (else ConfigError)."""
        if self._delay is None and self._at is None:
            raise ConfigError(f"task {self.task.name!r}: options().schedule() needs options(delay=...) or at=")
        return self.submit(*args, **kwargs)

    async def aschedule(self, *args: Any, **kwargs: Any) -> TaskHandle:
        if self._delay is None and self._at is None:
            raise ConfigError(f"task {self.task.name!r}: options().aschedule() needs options(delay=...) or at=")
        return await self.asubmit(*args, **kwargs)

    def map(self, arg_list: Iterable[Any]) -> list[TaskHandle]:
        prepared = [self._prepare(*_split(item)) for item in arg_list]
        return self.task._send(prepared) if prepared else []

    async def amap(self, arg_list: Iterable[Any]) -> list[TaskHandle]:
        prepared = [self._prepare(*_split(item)) for item in arg_list]
        return await self.task._asend(prepared) if prepared else []


def _split(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, dict):
        return (), item
    return (item,), {}


def _run_at(delay: float | None, at: _dt.datetime | None) -> float:
    if (delay is None) == (at is None):
        raise ConfigError(f"schedule() needs exactly one of delay= or at= (got delay={delay!r}, at={at!r})")
    if delay is not None:
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ConfigError(f"delay={delay!r}: expected seconds >= 0")
        return time.time() + delay
    assert at is not None
    if not isinstance(at, _dt.datetime):
        raise ConfigError(f"at={at!r}: expected a datetime")
    if at.tzinfo is None:
        at = at.replace(tzinfo=_dt.UTC)
    return at.timestamp()


def _positive_int(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name}={value!r}: expected an int >= 1 or None")
    return value


def _metrics_address(value: str | int | None) -> str | None:
    """``App(metrics=9464)`` or ``"HOST:PORT"``, checked now; served by the supervisor."""
    if value is None:
        return None
    from .metrics import normalize_address

    return normalize_address(value)


class App:
    """A named set of tasks and the settings of the runtime that runs them."""

    def __init__(
        self,
        name: str,
        state_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        process_workers: int | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        grace: float = 10.0,
        owner: str | None = None,
        max_restarts: int = 10,
        restart_window: float = 60.0,
        max_tasks_per_process: int | None = None,
        max_process_memory_mb: float | None = None,
        max_queued: int = 100_000,
        result_ttl: float | None = 7 * 24 * 3600.0,
        store: str | os.PathLike[str] | None = None,
        metrics: str | int | None = None,
        on_actor_start: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"App name must be a non-empty string, got {name!r}")
        self.name = name
        self.state_dir = state_dir
        self.workers = _positive_int("workers", workers)
        self.process_workers = _positive_int("process_workers", process_workers)
        self.max_payload_bytes = _positive_int("max_payload_bytes", max_payload_bytes) or DEFAULT_MAX_PAYLOAD
        if not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError(f"grace={grace!r}: expected seconds >= 0")
        self.grace = float(grace)
        self.owner = Session(owner or DEFAULT_OWNER_ID)
        self.max_restarts = _positive_int("max_restarts", max_restarts) or 10
        if restart_window <= 0:
            raise ConfigError(f"restart_window={restart_window!r}: expected seconds > 0")
        self.restart_window = float(restart_window)
        self.max_tasks_per_process = _positive_int("max_tasks_per_process", max_tasks_per_process)
        if max_process_memory_mb is not None and max_process_memory_mb <= 0:
            raise ConfigError(f"max_process_memory_mb={max_process_memory_mb!r}: expected MB > 0 or None")
        self.max_process_memory_mb = max_process_memory_mb
        self.max_queued = _positive_int("max_queued", max_queued) or 100_000
        if result_ttl is not None and (not isinstance(result_ttl, (int, float)) or result_ttl <= 0):
            raise ConfigError(f"result_ttl={result_ttl!r}: expected seconds > 0, or None to keep results forever")
        self.result_ttl = result_ttl
        self.store = bootstrap.check_store(store)  # None: SQLite in the state directory (bootstrap.py)
        self.metrics = _metrics_address(metrics)  # "HOST:PORT" of /metrics (capsule_actors.metrics), or None
        if on_actor_start is not None and not callable(on_actor_start):
            raise ConfigError(f"on_actor_start={on_actor_start!r}: expected a function of no arguments, or None")
        # run once in each worker and process actor as it starts (say, to set up an OpenTelemetry SDK)
        self.on_actor_start = on_actor_start
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, ScheduleSpec] = {}
        self.failure_hook: str | None = None  # the task name of the @on_failure hook
        # a workflow's record (flows.py): known to get_task, not one of the app's tasks; never run
        self._flow_task: Task[Any, Any] = Task(
            self, flow_record, name=FLOW_TASK, lock=None, on_conflict="join", retries=0, backoff=None,
            retry_on=None, timeout=None, process=False,
        )  # fmt: skip
        self._config: ClientConfig | None = None  # bound by app.start() or the CLI (bootstrap.py)
        self._client: AppClient | None = None  # the client found for it in this process (a cache)

    def __repr__(self) -> str:
        return f"<App {self.name} tasks={list(self.tasks)}>"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_config"] = state["_client"] = None  # each process resolves its own (bootstrap.py)
        return state

    # ---- declaring ---------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R]) -> Task[P, R]: ...
    @overload
    def task(
        self,
        fn: None = None,
        *,
        lock: str | None = None,
        on_conflict: str = "join",
        retries: int = 0,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        process: bool = False,
        name: str | None = None,
        priority: int = 0,
        rate_limit: str | RateLimit | None = None,
        concurrency: int | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        *,
        lock: str | None = None,
        on_conflict: str = "join",
        retries: int = 0,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        process: bool = False,
        name: str | None = None,
        priority: int = 0,
        rate_limit: str | RateLimit | None = None,
        concurrency: int | None = None,
    ) -> Any:
        """Register a task: ``@app.task`` or ``@app.task(lock=..., retries=..., ...)``.
        ``priority``: higher starts first; ``rate_limit``: "N/s", "N/m", "N/h" or a RateLimit;
        ``concurrency``: at most that many attempts at once (``limits.py``)."""

        def register(func: Callable[P, R]) -> Task[P, R]:
            if not callable(func):
                raise ConfigError(f"@task needs a function, got {func!r}")
            task = Task(
                self,
                func,
                name=name,
                lock=lock,
                on_conflict=on_conflict,
                retries=retries,
                backoff=backoff,
                retry_on=tuple(retry_on) if retry_on else None,
                timeout=timeout,
                process=process,
                priority=priority,
                rate_limit=rate_limit,
                concurrency=concurrency,
            )
            if task.name in self.tasks and self.tasks[task.name].fn is not func:
                raise ConfigError(f"app {self.name!r} already has a task named {task.name!r}; pass name=")
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    def schedule(
        self,
        cron: str,
        *,
        tz: str = "UTC",
        misfire: str = "skip",
        lock: str | None = None,
        process: bool = False,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
    ) -> Callable[[Callable[[], R]], Task[[], R]]:
        """Run the decorated function on a cron schedule (5 fields, or 6 with seconds), in ``tz``.

        Each firing submits one task bound to the app's owner session. Its lock defaults to the
        schedule's own name with on_conflict="join", so a slow run is never stacked by the next.
        A bad cron, time zone or misfire policy raises ConfigError here, at decoration time.
        """

        def register(func: Callable[[], R]) -> Task[[], R]:
            task_name = str(name or getattr(func, "__name__", ""))
            spec = ScheduleSpec(task_name, cron, tz, misfire)
            params = [
                p
                for p in inspect.signature(func).parameters.values()
                if p.name != "session"
                and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if params:
                raise ConfigError(
                    f"schedule {task_name!r}: a scheduled function takes no arguments "
                    f"(besides session), but it needs {[p.name for p in params]}"
                )
            task: Task[[], R] = self.task(
                lock=lock or task_name,
                on_conflict="join",
                process=process,
                name=task_name,
                retries=retries,
                timeout=timeout,
            )(func)
            self.schedules[task_name] = spec
            return task

        return register

    def on_failure(self, fn: Callable[[str, str, str, str, str], Any]) -> Task[Any, Any]:
        """``@app.on_failure``: run ``fn(task_id, name, error_type, error_message, traceback)`` in a
        worker actor when a task fails for good (its last attempt failed, or it crashed out), for
        alerting. Recorded in the same transaction as the failure, never retried: at most once per
        task, whatever crashes (a hook running when the supervisor dies is not run again)."""
        if self.failure_hook is not None and self.tasks[self.failure_hook].fn is not fn:
            raise ConfigError(f"app {self.name!r} has an on_failure hook already: {self.tasks[self.failure_hook].fn!r}")
        try:
            inspect.signature(fn).bind("id", "name", "Error", "message", "traceback")
        except (TypeError, ValueError):
            raise ConfigError(
                f"on_failure hook {fn!r} must take (task_id, name, error_type, error_message, traceback)"
            ) from None
        task: Task[Any, Any] = self.task(name=FAILURE_HOOK)(fn)
        self.failure_hook = FAILURE_HOOK
        return task

    def get_task(self, name: str) -> Task[Any, Any]:
        from .errors import UnknownTask

        try:
            return self.tasks[name]
        except KeyError:
            if name == FLOW_TASK:
                return self._flow_task
            raise UnknownTask(f"app {self.name!r} has no task {name!r}; it has {sorted(self.tasks)}") from None

    # ---- running -----------------------------------------------------------------------------
    def bind(self, config: ClientConfig | None) -> None:
        """Send this App's tasks to the supervisor ``config`` names (``app.start()`` and the CLI
        do; None unbinds). Unbound, it follows the process's configuration (``bootstrap.py``)."""
        self._config = config
        self._client = None

    def client_config(self) -> ClientConfig:
        """Where this App's submits go: its binding, else the process's (an actor's), else its
        ``state_dir`` or the environment's."""
        return self._config or bootstrap.process_config() or bootstrap.from_environment(self.state_dir)

    def resolved_state_dir(self) -> Path:
        return self.client_config().state_dir

    def client(self) -> AppClient:
        """This process's client of the app's running supervisor (NotRunning if none), or, where
        none runs and the store is PostgreSQL, of the store itself (``bootstrap.store_only``):
        decided once, then kept until it closes (or the process forks)."""
        client = self._client
        if client is None or client.closed or client.pid != current_pid():
            config = self.client_config()
            url = bootstrap.store_only(config, self.store)
            if url is not None:
                from .store_client import StoreClient

                client = self._client = StoreClient.shared(self, config, url)
            else:
                from .client import Client

                client = self._client = Client.shared(config)
        return client

    def start(self, **overrides: Any) -> Runtime:
        """Start a supervisor as a child process: ``with app.start() as runtime: ...``."""
        from .runtime import Runtime

        return Runtime(self, **overrides)

    def handle(self, task_id: str) -> TaskHandle:
        return TaskHandle.from_id(self, task_id)

    def session(self, session_id: str) -> Session:
        """A session as app code sees it: ``app.session("chat-1").db`` reads and writes its store."""
        return bound_session(session_id, None, None, self)

    def subscribe(self, session_id: str, after: int = 0, timeout: float | None = None) -> SessionSubscription:
        """``async for event in app.subscribe(sid, after=cursor)``: every event of the session's
        tasks from seq ``after`` on, as they happen; keep ``event.seq`` to resume after a restart.
        ``timeout``: an iteration lasting longer raises TimeoutError."""
        if not isinstance(session_id, str) or not session_id:
            raise ConfigError(f"subscribe() needs a session id, got {session_id!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise ConfigError(f"subscribe() timeout={timeout!r}: expected seconds >= 0 or None")
        return SessionSubscription(self, session_id, after, timeout)


default_app = App("default")


def task(fn: Any = None, **options: Any) -> Any:
    """``@cpsl.task`` on :data:`default_app`."""
    return default_app.task(fn, **options)


def schedule(cron: str, **options: Any) -> Any:
    """``@cpsl.schedule(cron)`` on :data:`default_app`."""
    return default_app.schedule(cron, **options)
