"""Hardening (issue 24) of what the runtime finds on disk: a state directory whose socket paths
are too long for ipc, and a supervisor.json left behind by a supervisor that is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli

import capsule_actors as cpsl
from capsule_actors.client import Client
from capsule_actors.transport import LOCK_FILE, RUNTIME_FILE, ensure_state_dir, read_runtime_file

app = cpsl.App("hardening-files", workers=1, process_workers=1)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task(process=True)
def multiply(x: int, y: int) -> int:
    return x * y


# ---- item 1: a long state directory ---------------------------------------------------------


def _state_dir_with_socket_path(base: Path, length: int) -> Path:
    """A state directory under ``base`` whose ``client.sock`` path is exactly ``length`` bytes."""
    shortest = len(os.fsencode(str(base / "d" / "state" / "client.sock")))
    long_dir = base / ("d" * (1 + length - shortest)) / "state"
    assert len(os.fsencode(str(long_dir / "client.sock"))) == length
    return long_dir


@pytest.mark.parametrize(
    "length",
    [
        101,  # client.sock one byte over the limit, actor.sock (a byte shorter) just within it
        140,  # both well over
    ],
)
def test_a_long_state_dir_serves_tasks_and_status_over_loopback_tcp(start, state_dir, length):
    # Given a state directory whose socket paths do not fit in sun_path (a pytest tmp_path a few
    # levels deep is enough)
    long_dir = _state_dir_with_socket_path(state_dir.parent, length)

    # When a runtime starts there
    rt = start(app, state_dir=long_dir)

    # Then both of its sockets are on loopback TCP with CURVE, announced in supervisor.json
    info = json.loads((long_dir / RUNTIME_FILE).read_text())
    assert info["client"].startswith("tcp://127.0.0.1:"), info
    assert info["actor"].startswith("tcp://127.0.0.1:"), info
    assert info["server_public"] and len(info["server_public"]) == 40

    # ... and tasks run on both kinds of actor (they reached the supervisor and got their Welcome)
    assert add.submit(2, 3).result(timeout=30) == 5
    assert multiply.submit(4, 5).result(timeout=30) == 20
    status = rt.status()
    assert status["supervisor"]["pid"] == rt.pid
    assert {a["slot"]: a["restarts"] for a in status["actors"]} == {"w0": 0, "p0": 0, "c0": 0}

    # ... and `capsule-actors status` answers there too
    shown = cli("status", state_dir=long_dir, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"supervisor pid {rt.pid} running" in shown.stdout


def test_a_short_state_dir_keeps_ipc(start, state_dir):
    # Given a state directory whose longest socket path is exactly at the limit
    at_limit = _state_dir_with_socket_path(state_dir.parent, 100)

    # When a runtime starts there, then both sockets are ipc files, without CURVE
    start(app, state_dir=at_limit)
    info = json.loads((at_limit / RUNTIME_FILE).read_text())
    assert info["client"] == f"ipc://{at_limit / 'client.sock'}"
    assert info["actor"] == f"ipc://{at_limit / 'actor.sock'}"
    assert info["server_public"] is None
    assert add.submit(1, 2).result(timeout=30) == 3


# ---- item 4: a stale supervisor.json whose pid lives on ---------------------------------------

SUBMIT = textwrap.dedent("""
    import json, sys, time
    import capsule_actors as cpsl

    app = cpsl.App("hardening-files", state_dir=sys.argv[1])

    @app.task
    async def add(x, y):
        return x + y

    began = time.monotonic()
    try:
        add.submit(1, 2)
        out = {"error": None}
    except cpsl.CapsuleError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    out["seconds"] = time.monotonic() - began
    print(json.dumps(out))
""")


def _submit_elsewhere(state_dir: Path) -> dict[str, Any]:
    """submit() in a fresh process, as an app would after a reboot; bounded (it used to hang)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT, str(state_dir)], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _point_runtime_file_at(state_dir: Path, pid: int) -> None:
    """Rewrite supervisor.json's pid, as if the pid of the supervisor that wrote it were reused."""
    path = state_dir / RUNTIME_FILE
    info = json.loads(path.read_text())
    info["pid"] = pid
    path.write_text(json.dumps(info))


def _assert_not_running(state_dir: Path, stale_pid: int) -> None:
    """submit() raises NotRunning at once, naming the stale file; status says not running."""
    out = _submit_elsewhere(state_dir)
    assert out["error"] == "NotRunning", out
    assert out["seconds"] < 5.0, out
    assert f"supervisor.json names pid {stale_pid}" in out["message"], out
    shown = cli("status", state_dir=state_dir, timeout=60)
    assert shown.returncode == 1, (shown.stdout, shown.stderr)
    # with a store there, status reads it and shows the supervisor as stopped, saying why
    said = "supervisor stopped: " if (state_dir / "capsule.db").exists() else "supervisor not running: "
    assert shown.stdout.startswith(said), (shown.stdout, shown.stderr)
    assert f"supervisor.json names pid {stale_pid}" in shown.stdout
    assert str(state_dir) in shown.stdout
    assert read_runtime_file(state_dir) is None  # what the board's feed and reconnects read


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is no supervisor: the owner of a reused pid."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_runtime_file_left_by_a_killed_supervisor_whose_pid_lives_on(start, state_dir, unrelated):
    # Given a supervisor that was SIGKILLed (supervisor.json and supervisor.lock stay) and whose
    # pid now belongs to another, live process (a reboot, a container restart)
    rt = start(app)
    assert add.submit(1, 1).result(timeout=30) == 2
    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)
    Client.close_all()
    assert (state_dir / LOCK_FILE).exists()
    _point_runtime_file_at(state_dir, unrelated.pid)

    # When an app submits, or an operator asks for the status, then both learn at once that no
    # supervisor runs (the lock on supervisor.lock is free, whatever the pid)
    _assert_not_running(state_dir, unrelated.pid)

    # ... and a supervisor that starts over the stale file serves as usual
    again = start(app)
    assert add.submit(2, 2).result(timeout=30) == 4
    info = read_runtime_file(state_dir)
    assert info is not None and info.pid == again.pid
    shown = cli("status", state_dir=state_dir, timeout=60)
    assert shown.returncode == 0 and f"supervisor pid {again.pid} running" in shown.stdout, shown.stderr


def test_a_runtime_file_written_by_hand_with_a_live_pid(state_dir, unrelated):
    # Given a supervisor.json naming a live process, in a state directory where no supervisor
    # ever ran (no supervisor.lock)
    ensure_state_dir(state_dir)
    (state_dir / RUNTIME_FILE).write_text(
        json.dumps(
            {
                "pid": unrelated.pid,
                "client": f"ipc://{state_dir / 'client.sock'}",
                "actor": f"ipc://{state_dir / 'actor.sock'}",
                "server_public": None,
                "started_at": 0.0,
                "state_dir": str(state_dir),
            }
        )
    )

    # Then it does not count as a running supervisor
    _assert_not_running(state_dir, unrelated.pid)
