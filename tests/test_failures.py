"""How things go wrong (SPEC section 2): task errors, retries, timeouts, cancel, bad input,
no supervisor, unknown ids -- against a real runtime."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

import capsule_actors as cpsl

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("failure-tests")
small_app = cpsl.App("failure-tests-small", max_payload_bytes=1000)

TINY = cpsl.Backoff(initial=0.01, jitter=False)


class ReportError(Exception):
    """An ordinary, picklable application error."""


class NeedsTwoArgs(Exception):
    """Pickles fine but cannot be rebuilt: unpickling calls NeedsTwoArgs(message) -> TypeError."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


def bump(counter: str) -> int:
    """Count attempts in a file (the actor runs in another process)."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def attempts_made(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


# ---- tasks --------------------------------------------------------------------------------

@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def explode_report(report_id: int) -> None:
    raise ReportError(f"report {report_id} failed")


@app.task
def explode_plain(key: str) -> None:
    raise KeyError(key)


@app.task
async def explode_unpicklable() -> None:
    raise NeedsTwoArgs(3, "disk full")


@app.task(retries=2, backoff=TINY)
async def flaky(counter: str, fails: int) -> int:
    n = bump(counter)
    if n <= fails:
        raise ValueError(f"attempt {n} fails")
    return n


@app.task(retries=3, backoff=TINY, retry_on=(KeyError,))
async def picky(counter: str, exc: str) -> int:
    n = bump(counter)
    if n == 1:
        raise KeyError("transient") if exc == "KeyError" else ValueError("permanent")
    return n


@app.task(timeout=0.3)
async def too_slow() -> str:
    await asyncio.sleep(30)
    return "never"


@app.task
async def gated(gate: str, value: int) -> int:
    deadline = time.monotonic() + 60
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        await asyncio.sleep(0.02)
    return value


@app.task
async def sleeper(marker: str) -> str:
    """Writes ``marker + ".started"`` when its body runs, ``marker`` when it sees its cancel."""
    Path(marker + ".started").write_text("started")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        Path(marker).write_text("cancelled")
        raise
    return "slept"


@app.task(lock="report:{report_id}")
async def locked_report(report_id: int, fmt: str = "pdf") -> str:
    return f"{report_id}.{fmt}"


@small_app.task
async def echo(value):
    return value


def bounded(fn, timeout: float = 10.0):
    """Call fn() in a daemon thread; fail the test (not hang it) if it does not return in time.
    For calls without a timeout parameter, like ``h.cancel()``."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{fn} did not return within {timeout} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


def recorded(rt: cpsl.Runtime) -> int:
    return sum(rt.status()["tasks"].values())


# ---- the task's own errors ----------------------------------------------------------------

def test_result_reraises_the_tasks_own_exception_with_remote_traceback(start):
    start(app)
    h = explode_report.submit(42)
    with pytest.raises(ReportError) as caught:
        h.result(timeout=30)
    exc = caught.value
    assert type(exc) is ReportError
    assert str(exc) == "report 42 failed"
    # the remote traceback text names the function that raised
    assert isinstance(exc.remote_traceback, str)
    assert "explode_report" in exc.remote_traceback
    assert "ReportError" in exc.remote_traceback
    assert exc.__cause__ is not None
    assert "explode_report" in str(exc.__cause__)
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED
    assert info.error == ("ReportError", "report 42 failed")
    assert info.attempts == 1
    # a plain def in the thread pool: same contract
    with pytest.raises(KeyError) as caught_key:
        explode_plain.submit("missing-key").result(timeout=30)
    assert caught_key.value.args == ("missing-key",)
    assert "explode_plain" in caught_key.value.remote_traceback
    # awaiting raises it the same way
    with pytest.raises(ReportError, match="report 5 failed"):
        asyncio.run(asyncio.wait_for(_await(explode_report.submit(5)), 30))


async def _await(h: cpsl.TaskHandle):
    return await h


def test_exception_that_cannot_be_unpickled_becomes_task_failed(start):
    start(app)
    h = explode_unpicklable.submit()
    with pytest.raises(cpsl.TaskFailed) as caught:
        h.result(timeout=30)
    exc = caught.value
    assert "NeedsTwoArgs" in str(exc)
    assert "disk full" in str(exc)
    assert isinstance(exc, cpsl.CapsuleError)
    assert "explode_unpicklable" in exc.remote_traceback
    assert h.status() is cpsl.TaskState.FAILED


# ---- retries ------------------------------------------------------------------------------

def test_retries_until_success(start, tmp_path):
    start(app)
    counter = tmp_path / "count"
    # Given a task that fails its first 2 attempts, with retries=2
    h = flaky.submit(str(counter), 2)
    # Then the third attempt succeeds
    assert h.result(timeout=30) == 3
    assert attempts_made(counter) == 3
    info = h.info()
    assert info.attempts == 3
    assert info.state is cpsl.TaskState.SUCCEEDED
    assert info.error is None


def test_retries_exhausted_raises_the_last_error(start, tmp_path):
    start(app)
    counter = tmp_path / "count"
    h = flaky.submit(str(counter), 100)
    with pytest.raises(ValueError, match="attempt 3 fails"):
        h.result(timeout=30)
    assert h.info().attempts == 1 + 2
    assert attempts_made(counter) == 3
    assert h.info().error == ("ValueError", "attempt 3 fails")


def test_retry_on_narrows_what_is_retried(start, tmp_path):
    start(app)
    # A ValueError is not in retry_on=(KeyError,): no retry
    not_retried = tmp_path / "value"
    h = picky.submit(str(not_retried), "ValueError")
    with pytest.raises(ValueError, match="permanent"):
        h.result(timeout=30)
    assert h.info().attempts == 1
    assert attempts_made(not_retried) == 1
    # A KeyError is: the second attempt succeeds
    retried = tmp_path / "key"
    h = picky.submit(str(retried), "KeyError")
    assert h.result(timeout=30) == 2
    assert h.info().attempts == 2


# ---- timeouts -----------------------------------------------------------------------------

def test_attempt_timeout_raises_task_timeout(start):
    start(app)
    started = time.monotonic()
    h = too_slow.submit()
    with pytest.raises(cpsl.TaskTimeout) as caught:
        h.result(timeout=30)
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, cpsl.CapsuleError)
    assert time.monotonic() - started < 20  # cancelled at its timeout, not after its 30 s sleep
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED
    assert info.error is not None and info.error[0] == "TaskTimeout"


def test_wait_timeout_raises_builtin_timeout_error_and_the_task_goes_on(start, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    h = gated.submit(str(gate), 8)
    # When the wait times out
    with pytest.raises(TimeoutError) as caught:
        h.result(timeout=0.2)
    # Then it is the builtin TimeoutError, not the task's TaskTimeout, and the task goes on
    assert not isinstance(caught.value, cpsl.CapsuleError)
    assert not h.status().terminal
    assert h.done() is False
    gate.touch()
    assert h.result(timeout=30) == 8
    assert h.status() is cpsl.TaskState.SUCCEEDED


# ---- cancel -------------------------------------------------------------------------------

def test_cancel_scheduled_task_never_starts(start):
    start(app)
    h = add.schedule(1, 2, delay=30)
    assert h.status() is cpsl.TaskState.SCHEDULED
    assert bounded(h.cancel) is True
    assert h.status() is cpsl.TaskState.CANCELLED
    with pytest.raises(cpsl.TaskCancelled):
        h.result(timeout=10)
    info = h.info()
    assert info.attempts == 0 and info.started_at is None
    assert info.finished_at is not None
    assert bounded(h.cancel) is False  # already finished
    # events end with CANCELLED and never show RUNNING
    states = [e.data["state"] for e in h.events() if e.kind == "state"]
    assert states[0] == "SCHEDULED" and states[-1] == "CANCELLED" and "RUNNING" not in states


def test_cancel_running_async_task(start, tmp_path):
    start(app)
    marker = tmp_path / "cancelled"
    started_file = tmp_path / "cancelled.started"
    # Given an async task whose body is running (sleeping 30 s)
    h = sleeper.submit(str(marker))
    wait_until(started_file.exists, timeout=30)
    assert h.status() is cpsl.TaskState.RUNNING
    started = time.monotonic()
    # When it is cancelled
    assert bounded(h.cancel) is True
    # Then its result raises TaskCancelled quickly
    with pytest.raises(cpsl.TaskCancelled):
        h.result(timeout=10)
    assert time.monotonic() - started < 5
    assert h.status() is cpsl.TaskState.CANCELLED
    # and the coroutine itself was cancelled at its await
    wait_until(marker.exists, timeout=10)
    assert bounded(h.cancel) is False
    # the actor keeps serving
    assert add.submit(2, 2).result(timeout=30) == 4


def test_cancel_right_after_dispatch_frees_the_actor(start, tmp_path):
    """A cancel that reaches the worker before the attempt's coroutine has started (the
    supervisor marks a task RUNNING when it sends it) must still end that attempt in the actor:
    nothing may stay counted as running there."""
    rt = start(app)
    marker = tmp_path / "cancelled"
    # Given a task that was just dispatched (submitted at once after start, cancelled as soon
    # as the store says RUNNING)
    h = sleeper.submit(str(marker))
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING, timeout=30)
    assert bounded(h.cancel) is True
    with pytest.raises(cpsl.TaskCancelled):
        h.result(timeout=10)
    # Then, whether or not its body had started, no actor keeps it as running
    wait_until(lambda: all(a["running"] == 0 for a in rt.status()["actors"]), timeout=10)
    assert add.submit(1, 1).result(timeout=30) == 2
    # and a graceful stop does not wait out the grace period for it
    started = time.monotonic()
    rt.stop()
    assert time.monotonic() - started < rt.grace


def test_cancel_of_a_finished_task_returns_false(start):
    start(app)
    h = add.submit(3, 4)
    assert h.result(timeout=30) == 7
    assert bounded(h.cancel) is False
    assert h.status() is cpsl.TaskState.SUCCEEDED
    assert h.result(timeout=10) == 7

    async def acancel():
        return await h.acancel()

    assert asyncio.run(asyncio.wait_for(acancel(), 30)) is False


# ---- bad input changes nothing ------------------------------------------------------------

def test_serialization_errors_at_submit_record_nothing(start):
    rt = start(small_app)
    before = recorded(rt)
    # an argument cloudpickle cannot pickle
    with pytest.raises(cpsl.SerializationError):
        echo.submit(threading.Lock())
    # a payload over max_payload_bytes=1000
    with pytest.raises(cpsl.SerializationError, match="max_payload_bytes"):
        echo.submit("x" * 5000)
    # one bad item spoils the whole batch, before anything is sent
    with pytest.raises(cpsl.SerializationError):
        echo.map(["fine", "y" * 5000])
    with pytest.raises(cpsl.SerializationError):
        asyncio.run(asyncio.wait_for(echo.asubmit(threading.Lock()), 30))
    assert isinstance(cpsl.SerializationError("x"), cpsl.CapsuleError)
    assert recorded(rt) == before
    # and the runtime keeps serving
    assert echo.submit("ok").result(timeout=30) == "ok"
    assert recorded(rt) == before + 1


def test_lock_template_argument_missing_at_submit_is_config_error(start):
    rt = start(app)
    before = recorded(rt)
    with pytest.raises(cpsl.ConfigError):
        locked_report.submit(fmt="csv")  # no report_id
    with pytest.raises(cpsl.ConfigError):
        locked_report.schedule(delay=1.0)
    assert recorded(rt) == before
    h = locked_report.submit(5, fmt="csv")
    assert h.lock_key == "report:5"
    assert h.result(timeout=30) == "5.csv"
    assert recorded(rt) == before + 1


# ---- no supervisor, unknown ids -----------------------------------------------------------

def test_submit_without_a_supervisor_raises_not_running(tmp_path):
    empty = tmp_path / "fresh-state"
    empty.mkdir()
    lonely = cpsl.App("lonely", state_dir=empty)

    @lonely.task
    async def job() -> int:
        return 1

    started = time.monotonic()
    with pytest.raises(cpsl.NotRunning) as caught:
        job.submit()
    assert "capsule-actors run" in str(caught.value)
    assert time.monotonic() - started < 10  # fails fast, no hang
    with pytest.raises(cpsl.NotRunning):
        asyncio.run(asyncio.wait_for(job.asubmit(), 30))
    with pytest.raises(cpsl.NotRunning):
        job.map([(), ()])
    # nothing was created on the way
    assert not (empty / "capsule.db").exists()


def test_from_id_of_unknown_task_raises_unknown_task(start):
    start(app)
    with pytest.raises(cpsl.UnknownTask):
        cpsl.TaskHandle.from_id(app, "f" * 32)
    # a real id still works on the same runtime
    h = add.submit(1, 1)
    again = cpsl.TaskHandle.from_id(app, h.id)
    assert again.name == "add"
    assert again.result(timeout=30) == 2
