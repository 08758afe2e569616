"""The PostgreSQL store as a user meets it: chosen by URL, a server that restarts under load, a
server gone for good, and the errors of a bad setup. Each test that restarts or stops a server
runs one of its own (the session's server is shared by the other tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, cli, wait_until
from postgres_server import PostgresServer, binaries

import capsule_actors as cpsl
from capsule_actors import testing
from capsule_actors.bootstrap import ClientConfig
from capsule_actors.store.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION

app = cpsl.App("pg-tests", workers=2, process_workers=1, grace=5.0)


@app.task
async def double(x: int) -> int:
    return 2 * x


@app.task(retries=3)
def slow_double(x: int) -> int:
    import time

    time.sleep(0.01)  # work, in a task body: the stream of tasks spans the server's restart
    return 2 * x


@pytest.fixture
def own_server(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A server of this test's own (it is restarted or stopped), stopped by pid afterwards."""
    assert binaries() is not None
    with PostgresServer(fsync=False) as server:
        server.create_database("capsule")
        yield server


def test_a_restarting_server_loses_nothing_and_the_supervisor_goes_on(own_server, state_dir):
    # Given a supervisor on PostgreSQL with a stream of tasks going through it
    url = own_server.url("capsule")
    with testing.start_runtime(app, state_dir, workers=2, process_workers=1, store=url, timeout=110) as rt:
        pid = rt.pid
        handles: list[cpsl.TaskHandle] = []
        stop = threading.Event()

        def submit_stream() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                handles.append(slow_double.submit(i))
                i += 1

        feeder = threading.Thread(target=submit_stream)
        feeder.start()
        try:
            wait_until(lambda: len(handles) >= 100, 30)
            # When the server restarts (every connection is cut) in the middle of it
            own_server.restart()
            wait_until(lambda: len(handles) >= 300, 60)
        finally:
            stop.set()
            feeder.join(60)
        # Then every acknowledged task completes, once, on the same supervisor, and status works
        assert [h.result(timeout=60) for h in handles] == [2 * i for i in range(len(handles))]
        assert rt.pid == pid and rt.process is not None and rt.process.poll() is None
        assert rt.status()["tasks"].get("SUCCEEDED") == len(handles)
        assert double.submit(21).result(timeout=30) == 42


def test_a_server_gone_for_good_stops_the_supervisor_and_a_restart_resumes(own_server, state_dir, procs, tmp_path):
    # Given a supervisor (`capsule-actors run`) that waits 3 s for a lost server, and a task queued
    (tmp_path / "pgmod.py").write_text(
        "import capsule_actors as cpsl\n"
        "app = cpsl.App('pg-gone', workers=1, process_workers=1)\n"
        "@app.task\nasync def add(x, y):\n    return x + y\n"
    )
    url = own_server.url("capsule") + "&outage=3"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), CAPSULE_STORE=url)
    cmd = [sys.executable, "-m", "capsule_actors", "run", "pgmod:app", "--state-dir", str(state_dir)]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(run)
    from conftest import wait_running

    wait_running(state_dir)
    sys.path.insert(0, str(tmp_path))
    try:
        import pgmod

        pgmod.app.bind(ClientConfig(state_dir))
        first = pgmod.add.submit(1, 2)
        assert first.result(timeout=30) == 3
        # When the server stops for longer than that
        own_server.halt("immediate")
        during = pgmod.add.submit(2, 3)  # journaled: this process keeps it until a supervisor takes it
        # Then the supervisor stops (it cannot keep what it would accept) with a clear message
        assert run.wait(30) == 1
        err = run.stderr.read().decode() if run.stderr else ""
        assert "StoreUnavailable" in err and "could not be reached for 3 s" in err and "Traceback" not in err
        # and with the server back, a new supervisor serves the same store (nothing was lost)
        own_server.resume()
        again = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(again)
        wait_running(state_dir)
        assert pgmod.add.submit(20, 22).result(timeout=30) == 42
        assert during.result(timeout=30) == 5  # the submit made during the outage was not lost
        assert cpsl.TaskHandle.from_id(pgmod.app, first.id).result(timeout=10) == 3
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pgmod", None)


def test_a_bad_setup_is_a_clear_error_that_names_the_url_without_its_password(state_dir, tmp_path):
    # an unreachable server, from app.start(): the URL named, the password not
    bad = f"postgresql://me:s3cret@/capsule?host={tmp_path}&port=1"
    with pytest.raises(cpsl.StateDirError, match=r"cannot reach the PostgreSQL store postgresql://me:\*\*\*@") as err:
        app.start(state_dir=state_dir, store=bad, start_timeout=60).start()
    assert "s3cret" not in str(err.value)
    # a password on run's command line is refused (ps would show it), saying where it goes
    r = cli("run", "mod:app", "--store", bad, state_dir=state_dir, timeout=60)
    assert r.returncode == 1 and "CAPSULE_STORE" in r.stderr and "PGPASSFILE" in r.stderr
    # an App with a store option that is not one
    with pytest.raises(cpsl.ConfigError, match="redis://"):
        cpsl.App("x", store="redis://localhost")
    # without psycopg installed, the error says what to install
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from capsule_actors import store\n"
        f"store.open_store(__import__('pathlib').Path({str(tmp_path)!r}), 'postgresql:///x', 'a')\n"
    )
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert missing.returncode == 1 and "pip install 'capsule_actors[postgres]'" in missing.stderr


def test_a_newer_schema_in_the_database_is_refused_at_start(postgres, state_dir):
    import psycopg

    url = postgres.url("capsule") + "&schema=from_the_future"
    with testing.start_runtime(app, state_dir, store=url, timeout=60):
        pass
    with psycopg.connect(postgres.url("capsule"), autocommit=True) as conn:
        conn.execute("UPDATE from_the_future.meta SET value='7' WHERE key='schema_version'")
    known = rf"schema version 7, newer than this capsule_actors knows \({PG_SCHEMA_VERSION}\)"
    with pytest.raises(cpsl.StateDirError, match=known):
        app.start(state_dir=state_dir, store=url, start_timeout=60).start()


def test_the_board_reads_a_postgresql_store_from_the_state_directory(postgres, state_dir, tmp_path: Path):
    url = postgres.url("capsule") + "&schema=board_pg"
    with testing.start_runtime(app, state_dir, store=url, timeout=60):
        h = double.submit(4)
        assert h.result(timeout=30) == 8
    # the supervisor has stopped; the board finds the store through store.json
    board = cpsl.ui.TaskBoard(state_dir)
    try:
        data = board.store.board()
        done = next(c for c in data["columns"] if c["state"] == "SUCCEEDED")
        assert [t["id"] for t in done["tasks"]] == [h.id]
    finally:
        board.store.close()
