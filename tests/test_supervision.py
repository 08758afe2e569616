"""Supervision with real signals: actors killed mid-task, injected crashes, dying clients, a
supervisor SIGKILLed under waiting handles, and a graceful stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from conftest import ROOT, spawn_cli, wait_until

import capsule_actors as cpsl
from capsule_actors import lifecycle, messages, testing
from capsule_actors.client import Client
from capsule_actors.store import DB_FILE
from capsule_actors.supervisor.router import owner
from capsule_actors.supervisor.specs import ChildSpec
from capsule_actors.transport import pid_alive, read_runtime_file

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("supervision-test", workers=2, process_workers=1, grace=5.0)


async def _hold(release: str, cap: float) -> None:
    """Run until the file ``release`` exists: the test decides when a task ends, without sleeps."""
    deadline = time.monotonic() + cap
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError("never released")
        await asyncio.sleep(0.02)


@app.task(retries=1)
async def hold_retry(i: int, release: str, cap: float = 60.0) -> int:
    await _hold(release, cap)
    return i


@app.task(retries=0)
async def hold_once(i: int, release: str, cap: float = 60.0) -> int:
    await _hold(release, cap)
    return i


@app.task(retries=1)
async def flaky(x: int) -> int:
    return x * 2


@app.task(retries=0)
async def fragile(x: int) -> int:
    return x


@app.task(retries=1, process=True)
def process_flaky() -> int:
    return os.getpid()


@app.task
async def add(x: int, y: int) -> int:
    return x + y


SERVICE_MODULE = textwrap.dedent('''
    import asyncio
    import os
    import time

    import capsule_actors as cpsl

    app = cpsl.App("supervision-cli", workers=1, process_workers=1, grace=10.0)


    def _released(release, cap):
        deadline = time.monotonic() + cap
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            yield


    @app.task(retries=1)
    async def hold(x, release, cap=60.0):
        for _ in _released(release, cap):
            await asyncio.sleep(0.02)
        return x * 10


    @app.task(process=True)
    def phold(x, release, cap=60.0):
        for _ in _released(release, cap):
            time.sleep(0.02)
        return x * 10
''')

CLIENT_SCRIPT = textwrap.dedent('''
    import sys

    import capsule_actors as cpsl

    app = cpsl.App("supervision-test", state_dir=sys.argv[1])


    @app.task(retries=0)
    async def hold_once(i, release, cap=60.0):
        raise AssertionError("runs in the supervisor's actors, never here")


    h = hold_once.submit(7, sys.argv[2])
    print(h.id, flush=True)
    try:
        h.result(timeout=0.3)
    except TimeoutError:
        pass
    print("waiting", flush=True)
    h.result()
    print("unreachable", flush=True)
''')




@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for blocking waits; every wait in them is bounded by its own timeout."""
    executor = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="test-wait")
    yield executor
    Client.close_all()  # fails any wait still outstanding, so the threads end
    executor.shutdown(wait=True, cancel_futures=True)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", value) or ("error", exception): lets a thread report instead of raising."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:
        return "error", exc


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of an unbuffered (bufsize=0) stdout: raw readline never reads past the newline."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no output from pid {proc.pid} within {timeout} s")
    return proc.stdout.readline().decode().strip()


def load_module(path: Path) -> ModuleType:
    """Import the service module in this process under a unique name (a client of the service)."""
    name = f"_cpsl_service_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def service_status(app_: cpsl.App) -> dict[str, Any]:
    body, _ = app_.client().call(lambda req: messages.Status(req), timeout=10)
    return dict(body)


def actors_by_slot(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["slot"]: a for a in status["actors"]}


# ---- actors that die -------------------------------------------------------------------------

def test_sigkill_of_a_worker_actor_with_tasks_in_flight(start, tmp_path, pool):
    rt = start(app, workers=2, process_workers=1)
    release = str(tmp_path / "release")

    # Given 20 async tasks in flight on two worker actors, half with retries=1, half retries=0
    kinds = [hold_retry, hold_retry, hold_once, hold_once] * 5
    handles = [task.submit(i, release) for i, task in enumerate(kinds)]
    wait_until(lambda: sum(a["running"] for a in rt.status()["actors"]) == 20, timeout=30)
    slot_of = {h.id: h.info().slot for h in handles}
    assert all(h.status() is cpsl.TaskState.RUNNING for h in handles)
    before = actors_by_slot(rt.status())
    # the victim runs both kinds of task, so both crash paths are exercised
    victim = next(slot for slot in ("w0", "w1")
                  if {h.name for h in handles if slot_of[h.id] == slot} == {"hold_retry", "hold_once"})
    old_pid = before[victim]["pid"]

    # When that worker actor is SIGKILLed
    waits = [pool.submit(outcome, h.result, timeout=60) for h in handles]
    os.kill(old_pid, signal.SIGKILL)

    # Then the retries=0 tasks it was running fail with WorkerCrashed, without waiting for the rest
    lost = [(h, w) for h, w in zip(handles, waits) if h.name == "hold_once" and slot_of[h.id] == victim]
    assert lost
    for h, w in lost:
        kind, value = w.result(timeout=30)
        assert kind == "error" and isinstance(value, cpsl.WorkerCrashed), (h, value)
        assert h.status() is cpsl.TaskState.FAILED

    # ... and the actor is restarted in the same slot with a new pid, its exit recorded
    def restarted() -> dict[str, Any] | None:
        row = actors_by_slot(rt.status())[victim]
        return row if row["pid"] not in (None, old_pid) and row["state"] == "ready" else None

    row = wait_until(restarted, timeout=30)
    assert row["restarts"] == 1
    assert "SIGKILL" in (row["last_exit"] or "")
    assert row["role"] == "worker"
    assert not pid_alive(old_pid)

    # When the tasks are let go, then every other handle returns its value in bounded time
    Path(release).touch()
    for i, (h, w) in enumerate(zip(handles, waits)):
        kind, value = w.result(timeout=60)
        if h.name == "hold_once" and slot_of[h.id] == victim:
            continue
        assert (kind, value) == ("ok", i), (h, slot_of[h.id], value)
        expected_attempts = 2 if slot_of[h.id] == victim else 1
        assert h.info().attempts == expected_attempts, (h, slot_of[h.id])
    other = next(s for s in ("w0", "w1") if s != victim)
    assert actors_by_slot(rt.status())[other]["pid"] == before[other]["pid"]


def test_crash_on_attempt_kills_the_attempt_and_the_retry_succeeds(start, pool):
    rt = start(app, workers=1, process_workers=1)

    def inject(task: cpsl.Task[Any, Any]) -> None:
        # bounded: the reply must come back, and the plan must be in place before we submit
        kind, value = pool.submit(outcome, testing.crash_on_attempt, task, attempt=1).result(timeout=10)
        assert kind == "ok", value

    # Given the first attempt of a retries=1 task set to crash its actor
    inject(flaky)
    # When it is submitted, then the first attempt dies and the retry returns the value
    h = flaky.submit(21)
    assert h.result(timeout=30) == 42
    info = h.info()
    assert info.attempts == 2 and info.state is cpsl.TaskState.SUCCEEDED
    worker = actors_by_slot(rt.status())["w0"]
    assert worker["restarts"] == 1

    # Given the same for a process=True task: the retry runs in a new process-isolated actor
    before = actors_by_slot(rt.status())["p0"]["pid"]
    inject(process_flaky)
    pid = process_flaky.submit().result(timeout=30)
    assert pid != before and pid == actors_by_slot(rt.status())["p0"]["pid"]
    assert actors_by_slot(rt.status())["p0"]["restarts"] == 1

    # Given a retries=0 task set to crash, then its result is WorkerCrashed
    inject(fragile)
    h = fragile.submit(5)
    with pytest.raises(cpsl.WorkerCrashed):
        h.result(timeout=30)
    assert h.info().attempts == 1 and h.status() is cpsl.TaskState.FAILED

    # ... and the runtime goes on serving
    assert add.submit(1, 2).result(timeout=30) == 3


# ---- clients and the supervisor that die ---------------------------------------------------

def test_a_client_that_dies_mid_wait_does_not_hurt_the_supervisor(start, procs, state_dir, tmp_path):
    rt = start(app, workers=1, process_workers=1)
    release = tmp_path / "release"
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)

    # Given a client process that submitted a task and blocks in result()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = subprocess.Popen([sys.executable, str(script), str(state_dir), str(release)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    procs.append(client)
    task_id = read_line(client, timeout=30)
    assert read_line(client, timeout=30) == "waiting"
    h = cpsl.TaskHandle.from_id(app, task_id)
    assert h.name == "hold_once"

    # When it is SIGKILLed mid-wait
    os.kill(client.pid, signal.SIGKILL)
    client.communicate(timeout=10)
    assert client.returncode == -signal.SIGKILL

    # Then the supervisor keeps serving: the task finishes and a new client gets its result
    assert h.status() in (cpsl.TaskState.QUEUED, cpsl.TaskState.RUNNING)
    release.touch()
    assert h.result(timeout=30) == 7
    assert add.submit(2, 2).result(timeout=30) == 4
    assert rt.status()["supervisor"]["pid"] == rt.pid


@pytest.fixture
def service(tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``supmod.py`` in tmp_path for `capsule-actors run supmod:app`, also imported here as a client."""
    (tmp_path / "supmod.py").write_text(SERVICE_MODULE)
    monkeypatch.setenv("CAPSULE_STATE_DIR", str(state_dir))
    return load_module(tmp_path / "supmod.py")


def start_service(procs: list[subprocess.Popen[bytes]], state_dir: Path, cwd: Path) -> subprocess.Popen[bytes]:
    run = spawn_cli(procs, "run", "supmod:app", state_dir=state_dir, cwd=cwd)
    wait_until(lambda: (info := read_runtime_file(state_dir)) is not None and info.pid == run.pid, timeout=30)
    return run


def test_a_waiting_handle_outlives_a_sigkilled_supervisor(procs, service, state_dir, tmp_path, pool):
    release = str(tmp_path / "release")
    run = start_service(procs, state_dir, tmp_path)

    # Given a RUNNING async task with a retry left, a RUNNING process task without one and a
    # process task QUEUED behind it (one process actor), each with a result() waiting on it
    running = service.hold.submit(1, release)
    p_running = service.phold.submit(2, release)
    wait_until(lambda: p_running.status() is cpsl.TaskState.RUNNING, timeout=30)
    p_queued = service.phold.submit(3, release)
    wait_until(lambda: running.status() is cpsl.TaskState.RUNNING, timeout=30)
    assert p_queued.status() is cpsl.TaskState.QUEUED
    waits = {h.id: pool.submit(outcome, h.result, timeout=60) for h in (running, p_running, p_queued)}
    actors = {a["pid"] for a in service_status(service.app)["actors"]}
    assert len(actors) == 3 and actors <= {p.pid for p in psutil.Process(run.pid).children(recursive=True)}

    # When the supervisor is SIGKILLed
    os.kill(run.pid, signal.SIGKILL)
    run.communicate(timeout=10)

    # Then its actors do not outlive it by more than a few seconds
    wait_until(lambda: not any(pid_alive(p) for p in actors), timeout=5)
    # ... and the waits go on (the tasks cannot have finished)
    assert not any(w.done() for w in waits.values())

    # When it is started again on the same state directory
    run2 = start_service(procs, state_dir, tmp_path)
    assert run2.pid != run.pid
    Path(release).touch()

    # Then the waiting result() calls return: the running task with a retry left was re-run
    assert waits[running.id].result(timeout=60) == ("ok", 10)
    assert running.info().attempts == 2
    # ... the one running without a retry failed with WorkerCrashed
    kind, value = waits[p_running.id].result(timeout=60)
    assert kind == "error" and isinstance(value, cpsl.WorkerCrashed), value
    # ... and the queued one ran after the restart
    assert waits[p_queued.id].result(timeout=60) == ("ok", 30)
    assert p_queued.info().attempts == 1

    os.kill(run2.pid, signal.SIGTERM)
    run2.communicate(timeout=30)
    assert run2.returncode == 0


def test_sigterm_lets_a_running_task_finish_within_grace(procs, service, state_dir, tmp_path, pool):
    release = tmp_path / "release"
    run = start_service(procs, state_dir, tmp_path)

    # Given a running task and a result() waiting on it
    h = service.hold.submit(4, str(release))
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING, timeout=30)
    wait = pool.submit(outcome, h.result, timeout=30)

    # When SIGTERM reaches the supervisor, and the task ends within the grace period
    os.kill(run.pid, signal.SIGTERM)
    wait_until(lambda: service_status(service.app)["supervisor"]["state"] == "stopping", timeout=10)
    release.touch()

    # Then the supervisor exits 0 and the task SUCCEEDED with its first attempt
    _, err = run.communicate(timeout=30)
    assert run.returncode == 0, err.decode(errors="replace")[-2000:]
    db = sqlite3.connect(f"file:{state_dir / DB_FILE}?mode=ro", uri=True)
    try:
        state, attempts = db.execute("SELECT state, attempts FROM tasks WHERE id=?", (h.id,)).fetchone()
    finally:
        db.close()
    assert (state, attempts) == ("SUCCEEDED", 1)
    assert wait.result(timeout=30) == ("ok", 40)

    # ... and after a restart the task is still SUCCEEDED and is not run again
    start_service(procs, state_dir, tmp_path)
    info = h.info()
    assert info.state is cpsl.TaskState.SUCCEEDED and info.attempts == 1
    assert cpsl.TaskHandle.from_id(service.app, h.id).result(timeout=10) == 40


def test_a_submit_that_raised_not_running_is_never_run_later(procs, service, state_dir, tmp_path):
    """What happens if the supervisor dies and a submit gives up with NotRunning: the request is
    withdrawn, so the supervisor that comes back never records or runs it."""
    run = start_service(procs, state_dir, tmp_path)
    assert service.hold.submit(1, str(tmp_path / "open"), 1.0) is not None  # the connection is up
    (tmp_path / "open").touch()
    os.kill(run.pid, signal.SIGKILL)
    run.wait(10)
    # once the client has seen the supervisor go (before that, a submit is journaled: durable, and
    # replayed by the next supervisor, which is another test's subject)
    wait_until(lambda: not service.app.client().connected, timeout=10)
    with pytest.raises(cpsl.NotRunning, match="withdrawn"):
        service.hold.submit(99, str(tmp_path / "open"), 1.0)
    start_service(procs, state_dir, tmp_path)
    assert service.hold.submit(2, str(tmp_path / "open"), 1.0).result(timeout=30) == 20  # serving again
    db = sqlite3.connect(f"file:{state_dir / 'capsule.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT count(*) FROM tasks WHERE name='hold'").fetchone()[0]
    finally:
        db.close()
    assert rows == 2  # the first and the last submit; the withdrawn one was never recorded


@app.task(lock="hold:{key}")
async def hold_key(key: str, release: str, cap: float = 60.0) -> str:
    await _hold(release, cap)
    return key


def test_a_graceful_stop_stops_the_children_in_reverse_start_order(start, tmp_path):
    """What if the stop begins while a later-started actor is busy? Children stop one at a time in
    reverse start order (c0, p0, w1, w0): the clock and the process actor go at once, w1 finishes
    its task first, and only then is w0 told to stop."""
    rt = start(app, workers=2, process_workers=1)
    key = next(f"k{i}" for i in range(1000) if owner(f"hold:k{i}", ["w0", "w1"]) == "w1")
    release = tmp_path / "release"
    h = hold_key.submit(key, str(release))
    wait_until(lambda: h.status() == cpsl.TaskState.RUNNING, 20)
    # When SIGTERM reaches the supervisor
    os.kill(rt.pid, signal.SIGTERM)

    def actors() -> dict[str, str]:
        return {a["slot"]: a["state"] for a in rt.status()["actors"]}

    # Then the clock and p0 (started last) are gone, w1 is stopping, w0 has not been asked yet
    states = wait_until(lambda: (s := actors())["c0"] == "down" and s["p0"] == "down" and s, 20)
    assert states["w1"] == "stopping" and states["w0"] == "ready"
    # When w1's task ends, w1 exits, then w0 is stopped, and the supervisor exits cleanly
    release.touch()
    assert h.result(timeout=20) == key
    assert rt.process is not None and rt.process.wait(20) == 0


@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
@pytest.mark.parametrize(
    "exit_kind, code",
    [("normal", 0), ("error", 1), ("parent gone", 3), ("injected crash", 70), ("SIGTERM", -signal.SIGTERM),
     ("SIGKILL", -signal.SIGKILL), ("segfault", -signal.SIGSEGV)],
)
def test_restart_types_decide_whether_an_exit_restarts_the_slot(restart: str, exit_kind: str, code: int):
    """OTP's matrix: permanent restarts after any exit, transient after an abnormal one only,
    temporary never (a deliberate replacement -- recycle, hard cancel -- is not a crash)."""
    spec = ChildSpec("w0", "worker", 1, 1.0, restart=restart)
    expected = {"permanent": True, "transient": exit_kind != "normal", "temporary": False}[restart]
    assert spec.restarts_after(code) is expected


def test_every_exit_code_of_ours_is_in_the_exit_table_and_a_bad_restart_type_is_refused():
    codes = {v for k, v in vars(lifecycle).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert codes == set(lifecycle.EXIT_REASONS)
    assert [c for c in codes if lifecycle.normal_exit(c)] == [lifecycle.EXIT_OK]
    with pytest.raises(ValueError, match="restart='sometimes'"):
        ChildSpec("w0", "worker", 1, 1.0, restart="sometimes")
