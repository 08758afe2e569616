"""Tools for testing your own tasks with the real runtime (no mocks needed).

from capsule_actors import testing

def test_report(tmp_path):
    with testing.start_runtime(app, tmp_path, timeout=60) as rt:
        testing.crash_on_attempt(build_report, attempt=1)   # first attempt's process dies
        assert build_report.submit(7).result(timeout=30) == "ok"   # the retry succeeds
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import messages
from .app import App, Task
from .handle import TaskHandle
from .runtime import Runtime
from .schedules import FakeClock as FakeClock  # drives schedules through given datetimes


@contextlib.contextmanager
def start_runtime(
    app: App,
    state_dir: str | os.PathLike[str],
    *,
    timeout: float = 120.0,
    workers: int | None = 1,
    process_workers: int | None = 1,
    grace: float = 5.0,
    store: str | None = None,
) -> Iterator[Runtime]:
    """Run a supervisor for the block; it is always stopped, and anything left is killed by pid.

    ``store``: a PostgreSQL URL (or SQLite file) instead of SQLite in ``state_dir``.
    ``timeout`` is a hard limit on the whole block: past it the supervisor and its actors are
    SIGKILLed, so waits in the test fail at once instead of hanging the suite.
    """
    runtime = Runtime(
        app, state_dir=state_dir, workers=workers, process_workers=process_workers, grace=grace, store=store
    )
    runtime.start()
    children = _descendants(runtime.pid)
    watchdog = threading.Timer(timeout, _kill_tree, args=(runtime.pid,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield runtime
    finally:
        watchdog.cancel()
        children |= _descendants(runtime.pid)
        runtime.stop(timeout=grace + 10.0)
        for pid in children:
            _kill(pid)


def crash_on_attempt(task: Task[Any, Any], attempt: int = 1) -> None:
    """Make attempt number ``attempt`` of ``task`` kill the actor process that runs it
    (``os._exit`` before the body starts), to test retries and WorkerCrashed paths."""
    task.app.client().call(lambda req: messages.InjectCrash(req, task.name, attempt))


def join(handles: list[TaskHandle], timeout: float) -> list[Any]:
    """All results in order; raises TimeoutError naming the first handle still running."""
    deadline = time.monotonic() + timeout
    results = []
    for handle in handles:
        try:
            results.append(handle.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise TimeoutError(f"{handle!r} still not done after {timeout} s (state {handle.status()})") from None
    return results


def _descendants(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    try:
        import psutil

        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except Exception:
        return set()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _kill_tree(pid: int | None) -> None:
    for child in _descendants(pid):
        _kill(child)
    if pid is not None:
        _kill(pid)


def fake_clock(app: App, start: Any) -> FakeClock:
    """A FakeClock over every schedule of ``app``, starting at the aware datetime ``start``."""
    return FakeClock(app.schedules.values(), start)


__all__ = ["start_runtime", "crash_on_attempt", "join", "FakeClock", "fake_clock"]
