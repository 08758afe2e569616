"""Process-isolated actors and OTP-style supervision: a matrix of how a process can end."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

import capsule_actors as cpsl

app = cpsl.App("isolated")
QUICK = cpsl.Backoff(initial=0.0, jitter=False)


def _first_time(marker: str) -> bool:
    """True on the first call for ``marker`` (a file), False afterwards."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


@app.task(process=True)
def pid_after_gate(gate: str, started: str) -> int:
    Path(started).touch()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@app.task(process=True, retries=1, backoff=QUICK)
def dies_once(how: str, marker: str) -> int:
    if _first_time(marker):
        if how == "exit":
            os._exit(1)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segfault":
            ctypes.string_at(0)
    return os.getpid()


@app.task(process=True, timeout=0.5)
def spins() -> None:
    while True:
        pass


@app.task(process=True)
def sleeps(seconds: float, started: str, ignore_sigterm: bool = False) -> str:
    if ignore_sigterm:  # process-wide, from this pool thread (signal.signal is main-thread only)
        ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN
    Path(started).touch()
    time.sleep(seconds)
    return "slept"


@app.task(process=True)
def getpid() -> int:
    return os.getpid()


@app.task(process=True)
def raises_timeout(text: str) -> None:
    raise TimeoutError(text)


@app.task(process=True)
def returns_after(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


_hoard: list[bytearray] = []


@app.task(process=True)
def grow(mb: int, gate: str | None = None) -> int:
    _hoard.append(bytearray(os.urandom(1024)) * (mb * 1024))  # touched pages count in RSS
    deadline = time.monotonic() + 30
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@app.task(process=True, retries=3, backoff=QUICK)
def always_dies() -> None:
    os._exit(1)


recycling = cpsl.App("recycling", max_tasks_per_process=2)
recycling_getpid = recycling.task(process=True)(getpid.fn)
limited = cpsl.App("limited", max_process_memory_mb=120)
limited_grow = limited.task(process=True)(grow.fn)
fragile = cpsl.App("fragile", max_restarts=1, restart_window=60)
fragile_dies = fragile.task(process=True, retries=3, backoff=QUICK)(always_dies.fn)


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _slot(rt: cpsl.Runtime, slot: str) -> dict:
    return next(a for a in rt.status()["actors"] if a["slot"] == slot)


def test_process_tasks_run_in_separate_processes_at_the_same_time(start, tmp_path):
    """What happens if two process=True tasks run at once: two processes, neither ours."""
    rt = start(app, process_workers=2)
    gate = tmp_path / "gate"
    started = [tmp_path / "s0", tmp_path / "s1"]
    handles = [pid_after_gate.submit(str(gate), str(s)) for s in started]
    wait_until(lambda: all(s.exists() for s in started))  # both run concurrently
    gate.touch()
    pids = [h.result(timeout=30) for h in handles]
    assert len(set(pids)) == 2
    assert not set(pids) & {os.getpid(), rt.pid}
    assert set(pids) <= {a["pid"] for a in rt.status()["actors"] if a["role"] == "process"}


@pytest.mark.parametrize("how, cause", [("exit", "exit code 1"), ("sigkill", "signal SIGKILL"),
                                        ("segfault", "signal SIGSEGV")])
def test_a_dying_process_is_replaced_and_its_task_retried(start, tmp_path, how, cause):
    """What happens if the process dies (os._exit, SIGKILL, segfault): the slot gets a fresh
    process, the cause is recorded, and the attempt is retried there."""
    rt = start(app, process_workers=1)
    before = _slot(rt, "p0")
    h = dies_once.submit(how, str(tmp_path / "marker"))
    pid = h.result(timeout=30)
    after = _slot(rt, "p0")
    assert pid == after["pid"] != before["pid"]
    assert h.info().attempts == 2
    assert after["restarts"] == 1 and after["last_exit"] == cause


def test_timeout_kills_an_infinite_loop_and_the_slot_keeps_serving(start):
    """What happens if a process task spins past its timeout: TaskTimeout, a new process."""
    rt = start(app, process_workers=1)
    before = _slot(rt, "p0")["pid"]
    with pytest.raises(cpsl.TaskTimeout):
        spins.submit().result(timeout=30)
    assert getpid.submit().result(timeout=30) not in (before, None)
    assert _slot(rt, "p0")["restarts"] == 0  # a deliberate replacement is not a crash


@pytest.mark.parametrize("ignore_sigterm, cause", [(False, "signal SIGTERM"), (True, "signal SIGKILL")])
def test_hard_cancel_ends_the_process(start, tmp_path, ignore_sigterm, cause):
    """What happens if a running process task is cancelled, even one that ignores SIGTERM."""
    rt = start(app, process_workers=1)
    started = tmp_path / "started"
    h = sleeps.submit(60, str(started), ignore_sigterm)
    wait_until(started.exists)
    victim = _slot(rt, "p0")["pid"]
    assert h.cancel()
    with pytest.raises(cpsl.TaskCancelled):
        h.result(timeout=10)
    wait_until(lambda: _dead(victim), timeout=10)
    slot = wait_until(lambda: (s := _slot(rt, "p0"))["state"] == "ready" and s["pid"] != victim and s)
    assert slot["last_exit"] == cause
    assert getpid.submit().result(timeout=30) == slot["pid"]


def test_recycled_after_max_tasks_per_process(start):
    start(recycling, process_workers=1)
    pids = [recycling_getpid.submit().result(timeout=30) for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_recycled_past_max_process_memory_without_losing_the_task(start, tmp_path):
    """What happens if a process grows past max_process_memory_mb: between tasks it is replaced;
    while running, its task finishes first and then it is replaced."""
    rt = start(limited, process_workers=1)
    first = limited_grow.submit(200).result(timeout=30)
    wait_until(lambda: _slot(rt, "p0")["pid"] not in (first, None) and _slot(rt, "p0")["state"] == "ready")
    # while running: the check sees the growth, the task still completes
    gate = tmp_path / "gate"
    h = limited_grow.submit(200, str(gate))
    wait_until(lambda: _slot(rt, "p0")["state"] == "stopping", timeout=20)
    gate.touch()
    pid = h.result(timeout=30)
    wait_until(lambda: _slot(rt, "p0")["pid"] not in (pid, None))
    assert _slot(rt, "p0")["restarts"] == 0


def test_restart_intensity_backs_off_instead_of_spinning(start):
    """What happens if a slot crashes more than max_restarts times in restart_window: it waits,
    longer each time, and says so in status."""
    rt = start(fragile, process_workers=1)
    h = fragile_dies.submit()
    seen_backoff = wait_until(lambda: _slot(rt, "p0")["state"] == "restarting", timeout=20)
    assert seen_backoff
    with pytest.raises(cpsl.WorkerCrashed):
        h.result(timeout=60)
    assert h.info().attempts == 4
    assert _slot(rt, "p0")["restarts"] == 4


def test_no_actor_outlives_a_sigkilled_supervisor(start):
    rt = start(app, workers=1, process_workers=2)
    family = {p.pid for p in psutil.Process(rt.pid).children(recursive=True)}
    assert len(family) == 5  # the template, three actors and the clock
    os.kill(rt.pid, signal.SIGKILL)
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in family),
               timeout=5)


def test_short_and_long_bodies_and_a_body_s_own_timeout_error(start):
    """A process actor waits in place for a short body (up to 2 ms) and on its loop for a longer
    one; a TimeoutError the body raises itself is its outcome, not taken for that wait's end."""
    start(app, process_workers=1)
    # a body past the in-place wait, then short ones on the same actor, in order
    handles = [returns_after.submit(s) for s in (0.05, 0.0, 0.0005, 0.0)]
    assert [h.result(timeout=30) for h in handles] == [0.05, 0.0, 0.0005, 0.0]
    failed = raises_timeout.submit("the body's own")
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="the body's own"):
        failed.result(timeout=30)
    assert time.monotonic() - began < 20  # its outcome, not the wait for it running out
    info = failed.info()
    assert info.state == "FAILED" and info.error is not None and info.error[0] == "TimeoutError", info

