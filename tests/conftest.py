"""Fixtures that start real runtimes and always stop them (by pid), with deadlines everywhere."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import capsule_actors as cpsl
from capsule_actors import testing
from capsule_actors.client import Client

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short private state directory (ipc socket paths must stay under ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="cpsl-") as d:
        yield Path(d) / "state"


@pytest.fixture
def start(state_dir: Path, store_url: str | None) -> Iterator[Callable[..., cpsl.Runtime]]:
    """start(app, **kw) -> a running Runtime on this test's state dir (and store: see ``STORES``
    below), stopped at teardown."""
    stack = contextlib.ExitStack()

    def _start(app: cpsl.App, **kw: Any) -> cpsl.Runtime:
        kw.setdefault("timeout", 110.0)
        kw.setdefault("store", store_url)
        return stack.enter_context(testing.start_runtime(app, kw.pop("state_dir", state_dir), **kw))

    with stack:
        yield _start
    Client.close_all()


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    """No client connection (and its I/O thread) outlives a test."""
    yield
    Client.close_all()


@pytest.fixture
def procs(state_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts by hand; all are killed (with their children) at teardown.

    It depends on ``state_dir`` so that pytest tears it down first: the processes are gone
    before their state directory is removed (else a supervisor still writing races the rmtree).
    """
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        kill_tree(proc.pid)
        with contextlib.suppress(Exception):
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def skip_or_fail(reason: str) -> None:
    """Skip a test this machine cannot run (no browser, not root), except in CI (``CI=true``),
    which installs and runs everything: there a missing prerequisite fails the test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, yet {reason}")
    pytest.skip(reason)


def kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def append_line(path: str, line: str) -> None:
    """One line appended atomically (O_APPEND, one small write): tasks in several processes
    record what they did in one file without their lines ever mixing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy; fail the test (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def cli(*args: str, state_dir: Path | None = None, cwd: Path | None = None, timeout: float = 60.0,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m capsule_actors ARGS`` to completion (bounded)."""
    cmd = [sys.executable, "-m", "capsule_actors", *args]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd or ROOT), str(ROOT)]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=check)


def spawn_cli(procs: list[subprocess.Popen[bytes]], *args: str, state_dir: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m capsule_actors ARGS --state-dir`` in the background (killed at teardown)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "capsule_actors", *args, "--state-dir", str(state_dir)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc


def wait_running(state_dir: Path, timeout: float = 30.0) -> Any:
    from capsule_actors.transport import read_runtime_file

    return wait_until(lambda: read_runtime_file(state_dir), timeout)


# ---- stores ------------------------------------------------------------------------------------
# A module that sets ``STORES = ("sqlite", "postgresql")`` runs its tests that use ``store_kind``
# (directly, or through ``start``) on both stores; every other module on SQLite only.


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        kinds = getattr(metafunc.module, "STORES", ("sqlite",))
        metafunc.parametrize("store_kind", kinds, ids=[f"store={k}" for k in kinds])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One real PostgreSQL server for the test session (private socket, stopped by pid)."""
    from postgres_server import PostgresServer, binaries

    if binaries() is None:
        skip_or_fail("PostgreSQL is not installed (`apt-get install postgresql`, as .ci/run does)")
    with PostgresServer(fsync=False) as server:
        server.create_database("capsule")
        yield server


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A PostgreSQL store URL of its own (a fresh schema) for one test."""
    import uuid

    return postgres.url("capsule") + f"&schema=t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store_url(request: pytest.FixtureRequest, store_kind: str) -> str | None:
    """The store a test's runtime uses: None (SQLite in the state directory) or a PostgreSQL URL."""
    if store_kind == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def task_store_factory(store_url: str | None, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Open (again) this test's store directly, as the supervisor does; all closed at teardown."""
    from capsule_actors import store

    opened: list[Any] = []

    def _open() -> Any:
        opened.append(store.open_store(tmp_path, store_url, "test"))
        return opened[-1]

    yield _open
    for db in opened:
        db.close()


@pytest.fixture
def task_store(task_store_factory: Callable[[], Any]) -> Any:
    return task_store_factory()


@pytest.fixture
def store_reader(store_url: str | None, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    from capsule_actors import store

    opened: list[Any] = []

    def _open() -> Any:
        reader = store.open_reader(tmp_path, store_url, "test")
        assert reader is not None
        opened.append(reader)
        return reader

    yield _open
    for reader in opened:
        reader.close()
