"""The ``capsule-actors`` command with real processes and real signals: run, submit, tasks,
status, cancel, the pid lock, and the errors a shell user sees."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import cli, spawn_cli, wait_running, wait_until

from capsule_actors import store
from capsule_actors.transport import RUNTIME_FILE, pid_alive, read_runtime_file

MODULE = textwrap.dedent('''
    import asyncio

    import capsule_actors as cpsl

    app = cpsl.App("cli-test", workers=1, process_workers=1, grace=5.0)


    @app.task
    async def add(x, y):
        return x + y


    @app.task
    async def slow(seconds=60.0):
        await asyncio.sleep(seconds)
        return "slept"


    @app.task
    async def boom():
        raise ValueError("boom on purpose")
''')

HEX_ID = re.compile(r"[0-9a-f]{32}")
STORES = ("sqlite", "postgresql")  # the tests that run a supervisor run on both stores


def _store(url: str | None) -> list[str]:
    """``run``'s ``--store`` for this test's store (a URL without a password: the test server trusts)."""
    return ["--store", url] if url else []


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory holding ``mod.py`` (MODULE:APP is ``mod:app``), used as the cwd."""
    (tmp_path / "mod.py").write_text(MODULE)
    return tmp_path



def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 30.0) -> tuple[int, str]:
    """Send ``sig`` and wait (bounded) for the exit; return (exit code, stderr)."""
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def actor_pids(pid: int) -> set[int]:
    """The supervisor's descendants: the actor template and the actors it forked (w0, p0, c0)."""
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def bounded_cli(*args: str, state_dir: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """cli() that fails the test with what the command printed when it does not finish in time."""
    try:
        return cli(*args, state_dir=state_dir, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"`capsule-actors {' '.join(args)}` did not finish within {timeout} s; stderr: {err!r}")


def tasks_json(state_dir: Path, project: Path, *extra: str) -> list[dict[str, Any]]:
    r = cli("tasks", "--json", *extra, state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_run_serves_submit_tasks_status_cancel_and_sigterm_stops_it(procs, project, state_dir, store_url):
    # Given `capsule-actors run mod:app` in the background
    run = spawn_cli(procs, "run", "mod:app", *_store(store_url), state_dir=state_dir, cwd=project)
    info = wait_running(state_dir)
    assert info.pid == run.pid

    # When a task is submitted with --wait, then its result is printed as JSON
    r = cli("submit", "mod:app", "add", "[1, 2]", "--wait", state_dir=state_dir, cwd=project)
    assert (r.returncode, r.stdout.strip()) == (0, "3"), r.stderr

    # ... and a task that raises makes submit --wait fail, naming the error
    r = cli("submit", "mod:app", "boom", "--wait", state_dir=state_dir, cwd=project)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "boom on purpose" in r.stderr

    # When submitted without --wait, then the 32-hex task id is printed
    r = cli("submit", "mod:app", "add", '{"x": 5, "y": 6}', state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    add_id = r.stdout.strip()
    assert HEX_ID.fullmatch(add_id), r.stdout
    r = cli("submit", "mod:app", "slow", "[60]", state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    slow_id = r.stdout.strip()
    assert HEX_ID.fullmatch(slow_id) and slow_id != add_id

    # Then `tasks --json` lists them newest first, each with its state
    def settled() -> list[dict[str, Any]] | None:
        rows = tasks_json(state_dir, project)
        by_id = {t["id"]: t for t in rows}
        ok = by_id.get(slow_id, {}).get("state") == "RUNNING" and by_id.get(add_id, {}).get("state") == "SUCCEEDED"
        return rows if ok else None

    rows = wait_until(settled, timeout=30)
    assert len(rows) == 4
    assert [t["id"] for t in rows[:2]] == [slow_id, add_id]
    assert [t["name"] for t in rows] == ["slow", "add", "boom", "add"]
    assert [t["state"] for t in rows] == ["RUNNING", "SUCCEEDED", "FAILED", "SUCCEEDED"]
    created = [t["created_at"] for t in rows]
    assert created == sorted(created, reverse=True)
    failed = rows[2]
    assert failed["error_type"] == "ValueError" and "boom on purpose" in failed["error_message"]

    # ... and `tasks --status succeeded` keeps only the succeeded ones
    ok_rows = tasks_json(state_dir, project, "--status", "succeeded")
    assert {t["state"] for t in ok_rows} == {"SUCCEEDED"}
    assert len(ok_rows) == 2 and ok_rows[0]["id"] == add_id
    table = cli("tasks", "--status", "running", state_dir=state_dir, cwd=project)
    assert table.returncode == 0 and slow_id[-8:] in table.stdout and add_id[-8:] not in table.stdout

    # `--store` on a command that talks to the supervisor must name the store that supervisor uses:
    # the same one lists the same rows; another is refused naming both, and nothing is submitted
    same = store_url or str(store.sqlite_path(state_dir, None))
    assert [t["id"] for t in tasks_json(state_dir, project, "--store", same)] == [t["id"] for t in rows]
    other = str(state_dir.parent / "other.db") if store_url else "postgresql://nobody@127.0.0.1:1/elsewhere"
    r = cli("submit", "mod:app", "add", "[1, 1]", "--store", other, state_dir=state_dir, cwd=project)
    assert r.returncode == 1 and other in r.stderr and "the supervisor of" in r.stderr, r.stderr
    r = cli("tasks", "--store", "postgresql://me:s3cret@127.0.0.1/db", state_dir=state_dir, cwd=project)
    assert r.returncode == 1 and "s3cret" not in r.stderr and "PGPASSFILE" in r.stderr, r.stderr
    assert len(tasks_json(state_dir, project)) == 4

    # Then `status --json` shows the supervisor and every actor
    r = cli("status", "--json", state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["supervisor"]["pid"] == run.pid
    actors = {a["slot"]: a for a in status["actors"]}
    assert {slot: a["role"] for slot, a in actors.items()} == {"w0": "worker", "p0": "process", "c0": "clock"}
    children = actor_pids(run.pid)
    for a in actors.values():
        assert a["pid"] in children and a["pid"] != run.pid
        assert a["state"] == "ready"
        assert a["restarts"] == 0
        assert isinstance(a["rss"], int) and a["rss"] > 1 << 20
    assert actors["w0"]["running"] == 1  # the slow task
    assert actors["p0"]["running"] == 0
    text = cli("status", state_dir=state_dir, cwd=project)
    assert text.returncode == 0 and str(run.pid) in text.stdout and "w0" in text.stdout

    # When SIGTERM reaches `run`, then it stops gracefully with exit code 0 and cleans up
    code, err = stop(run, signal.SIGTERM)
    assert code == 0, err
    assert not (state_dir / RUNTIME_FILE).exists()
    wait_until(lambda: not any(pid_alive(p) for p in children), timeout=10)


def test_cancel_of_a_running_task_prints_cancelled(procs, project, state_dir, store_url):
    # Given a long task running under `capsule-actors run`
    spawn_cli(procs, "run", "mod:app", *_store(store_url), state_dir=state_dir, cwd=project)
    wait_running(state_dir)
    r = cli("submit", "mod:app", "slow", "[60]", state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    slow_id = r.stdout.strip()
    wait_until(lambda: {t["id"]: t["state"] for t in tasks_json(state_dir, project)}.get(slow_id) == "RUNNING",
               timeout=30)

    # When it is cancelled from the shell, then "cancelled" is printed and the task is CANCELLED
    r = bounded_cli("cancel", slow_id, state_dir=state_dir, cwd=project, timeout=20)
    assert (r.returncode, r.stdout.strip()) == (0, "cancelled"), r.stderr
    assert {t["id"]: t["state"] for t in tasks_json(state_dir, project)}[slow_id] == "CANCELLED"

    # ... and cancelling it again does not claim to cancel it twice
    again = bounded_cli("cancel", slow_id, state_dir=state_dir, cwd=project, timeout=20)
    assert again.stdout.strip() != "cancelled"


def test_second_run_refuses_while_the_first_serves_and_sigint_stops_it(procs, project, state_dir, store_url):
    # Given a running supervisor
    first = spawn_cli(procs, "run", "mod:app", *_store(store_url), state_dir=state_dir, cwd=project)
    wait_running(state_dir)
    children = wait_until(lambda: len(actor_pids(first.pid)) == 4 and actor_pids(first.pid))

    # When a second `run` starts on the same state directory, then it refuses with a clear error
    second = cli("run", "mod:app", state_dir=state_dir, cwd=project, timeout=60)
    assert second.returncode != 0
    assert "already running" in second.stderr.lower()
    assert "Traceback" not in second.stderr

    # ... and the first keeps serving, its runtime file untouched
    info = read_runtime_file(state_dir)
    assert info is not None and info.pid == first.pid
    r = cli("submit", "mod:app", "add", "[2, 3]", "--wait", state_dir=state_dir, cwd=project)
    assert (r.returncode, r.stdout.strip()) == (0, "5"), r.stderr

    # When SIGINT reaches it, then it stops with exit code 0 and removes supervisor.json
    code, err = stop(first, signal.SIGINT)
    assert code == 0, err
    assert not (state_dir / RUNTIME_FILE).exists()
    wait_until(lambda: not any(pid_alive(p) for p in children), timeout=10)


def _run_all(calls: list[tuple[str, ...]], state_dir: Path, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cli, *args, state_dir=state_dir, cwd=cwd) for args in calls]
        return [f.result(timeout=90) for f in futures]


def test_commands_without_a_supervisor_say_how_to_start_one(project, state_dir):
    calls = [("tasks",), ("status",), ("status", "--json"), ("cancel", "0" * 32),
             ("submit", "mod:app", "add", "[1, 2]")]
    for args, r in zip(calls, _run_all(calls, state_dir, project)):
        assert r.returncode != 0, args
        said = r.stdout if args == ("status",) else r.stderr  # "not running" is status's answer
        assert "capsule-actors run" in said, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
    assert not (state_dir / RUNTIME_FILE).exists()


def test_bad_input_gets_a_clear_error_and_a_nonzero_exit(project, state_dir):
    cases: list[tuple[tuple[str, ...], list[str]]] = [
        (("submit", "no_such_module_xyz:app", "add", "[1, 2]"), ["no_such_module_xyz"]),
        (("run", "no_such_module_xyz:app"), ["no_such_module_xyz"]),
        (("submit", "mod", "add", "[1, 2]"), ["MODULE:APP"]),
        (("submit", "mod:no_such_app", "add", "[1, 2]"), ["no_such_app"]),
        (("submit", "mod:asyncio", "add", "[1, 2]"), ["asyncio", "App"]),
        (("submit", "mod:app", "add", "[1, 2"), ["[1, 2", "JSON"]),
        (("submit", "mod:app", "no_such_task", "[1]"), ["no_such_task", "add", "slow", "boom"]),
        (("tasks", "--state", "queued"), ["unrecognized arguments: --state queued"]),  # not --state-dir
    ]
    results = _run_all([args for args, _ in cases], state_dir, project)
    for (args, needles), r in zip(cases, results):
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, (args, r.stderr)
        for needle in needles:
            assert needle in r.stderr, (args, needle, r.stderr)
    # bad input never reached (or started) a runtime
    assert not (state_dir / RUNTIME_FILE).exists()


def test_help_works_as_module_and_console_script(project):
    r = cli("--help", cwd=project)
    assert r.returncode == 0, r.stderr
    for command in ("run", "submit", "tasks", "status", "cancel"):
        assert command in r.stdout
    script = Path(sys.executable).parent / "capsule-actors"
    assert script.is_file() and os.access(script, os.X_OK), script
    r2 = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=project)
    assert r2.returncode == 0, r2.stderr
    assert "capsule-actors" in r2.stdout
    assert all(command in r2.stdout for command in ("run", "submit", "tasks", "status", "cancel"))
    r3 = subprocess.run([str(script), "submit", "--help"], capture_output=True, text=True, timeout=60, cwd=project)
    assert r3.returncode == 0 and "--wait" in r3.stdout
    # the help speaks to users: where the state directory comes from, not how the code reads it
    assert "bootstrap" not in r.stdout and "``" not in r.stdout
    assert "$CAPSULE_STATE_DIR" in r.stdout and "./.capsule" in r.stdout and "info" in r.stdout


def test_reading_commands_read_the_store_when_no_supervisor_runs(procs, project, state_dir, store_url):
    # Given a supervisor that ran tasks and stopped
    run = spawn_cli(procs, "run", "mod:app", *_store(store_url), state_dir=state_dir, cwd=project)
    wait_running(state_dir)
    r = cli("submit", "mod:app", "add", "[1, 2]", "--wait", state_dir=state_dir, cwd=project)
    assert (r.returncode, r.stdout.strip()) == (0, "3"), r.stderr
    assert cli("submit", "mod:app", "boom", "--wait", state_dir=state_dir, cwd=project).returncode == 1
    online = tasks_json(state_dir, project)
    assert [t["name"] for t in online] == ["boom", "add"]
    code, err = stop(run, signal.SIGTERM)
    assert code == 0, err
    before = sorted((p.name, p.stat().st_mtime_ns) for p in state_dir.iterdir() if p.is_file())

    # When the reading commands run, then they read the store directly, saying so on stderr
    r = cli("tasks", "--json", state_dir=state_dir, cwd=project)
    assert r.returncode == 0, r.stderr
    assert "no supervisor is running" in r.stderr and "reading its task store directly" in r.stderr
    offline = json.loads(r.stdout)
    assert [(t["id"], t["state"]) for t in offline] == [(t["id"], t["state"]) for t in online]
    assert offline[0]["error_type"] == "ValueError"
    r = cli("tasks", "--status", "failed", state_dir=state_dir, cwd=project)
    assert r.returncode == 0 and online[0]["id"][-8:] in r.stdout and online[1]["id"][-8:] not in r.stdout
    r = cli("info", online[1]["id"][-8:], state_dir=state_dir, cwd=project)
    assert r.returncode == 0 and online[1]["id"] in r.stdout and "SUCCEEDED" in r.stdout, r.stderr
    r = cli("info", online[0]["id"], "--json", state_dir=state_dir, cwd=project)
    assert r.returncode == 0 and json.loads(r.stdout)["error_message"] == "boom on purpose", r.stderr
    r = cli("status", state_dir=state_dir, cwd=project)
    assert r.returncode == 1 and "supervisor stopped" in r.stdout and "capsule-actors run" in r.stdout
    assert "succeeded 1" in r.stdout and "failed 1" in r.stdout and "reading its task store" in r.stderr
    r = cli("status", "--json", state_dir=state_dir, cwd=project)
    status = json.loads(r.stdout)
    assert status["supervisor"]["state"] == "stopped" and status["tasks"] == {"SUCCEEDED": 1, "FAILED": 1}

    # ... and a command that changes things says it needs a running supervisor
    r = cli("cancel", online[1]["id"][-8:], state_dir=state_dir, cwd=project)
    assert r.returncode == 1 and "needs a running supervisor" in r.stderr and "capsule-actors run" in r.stderr

    # Then reading created, changed and locked nothing: a supervisor starts on the directory at once
    assert sorted((p.name, p.stat().st_mtime_ns) for p in state_dir.iterdir() if p.is_file()) == before
    again = spawn_cli(procs, "run", "mod:app", *_store(store_url), state_dir=state_dir, cwd=project)
    assert wait_running(state_dir).pid == again.pid
    assert [t["id"] for t in tasks_json(state_dir, project)] == [t["id"] for t in online]
    assert stop(again, signal.SIGTERM)[0] == 0


def test_info_and_cancel_take_a_short_id(procs, project, state_dir):
    spawn_cli(procs, "run", "mod:app", state_dir=state_dir, cwd=project)
    wait_running(state_dir)
    slow_id = cli("submit", "mod:app", "slow", "[60]", state_dir=state_dir, cwd=project).stdout.strip()
    assert HEX_ID.fullmatch(slow_id)
    r = cli("info", slow_id[-8:], "--json", state_dir=state_dir, cwd=project)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == slow_id, r.stderr
    r = bounded_cli("cancel", slow_id[-10:], state_dir=state_dir, cwd=project, timeout=20)
    assert (r.returncode, r.stdout.strip()) == (0, "cancelled"), r.stderr
    assert {t["id"]: t["state"] for t in tasks_json(state_dir, project)}[slow_id] == "CANCELLED"
    r = cli("info", "0" * 8, state_dir=state_dir, cwd=project)
    assert r.returncode == 1 and "UnknownTask" in r.stderr and "00000000" in r.stderr
