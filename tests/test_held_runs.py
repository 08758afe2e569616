"""Held Runs: a process actor is sent its next Run while it runs one, so it never waits a round
trip between tasks. A held Run is not an attempt until it begins: a cancel, a crash, a timeout,
a recycle or a free slot elsewhere treats it as still queued."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import wait_until

import capsule_actors as cpsl

app = cpsl.App("held")
limited = cpsl.App("held-limited", max_process_memory_mb=120)


def _wait_for(gate: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


@app.task(process=True)
def gated(gate: str, started: str, then: float = 0.0) -> int:
    """Say where it runs (its pid, in ``started``), wait for ``gate``, then work ``then`` seconds."""
    Path(started).write_text(str(os.getpid()))
    _wait_for(gate)
    time.sleep(then)
    return os.getpid()


@app.task(process=True)
def crashes_at_gate(gate: str, started: str) -> None:
    Path(started).write_text(str(os.getpid()))
    _wait_for(gate)
    os._exit(1)


@app.task(process=True)
def mark(log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


@app.task(process=True, timeout=1.0)
def brief(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@limited.task(process=True)
def grow(mb: int, gate: str) -> int:
    hoard = bytearray(os.urandom(1024)) * (mb * 1024)  # touched pages count in RSS
    _wait_for(gate)
    return os.getpid() + 0 * len(hoard)


limited_mark = limited.task(process=True, name="mark")(mark.fn)
_KEPT: list[bytearray] = []


@limited.task(process=True)
def grow_at_the_end(mb: int, gate: str) -> int:
    """Wait for ``gate``, then grow by ``mb`` and keep it: the process stays big after the task."""
    _wait_for(gate)
    _KEPT.append(bytearray(os.urandom(1024)) * (mb * 1024))
    return os.getpid()


def _actor(rt: cpsl.Runtime, slot: str) -> dict:
    return next(a for a in rt.status()["actors"] if a["slot"] == slot)


def _held(rt: cpsl.Runtime) -> dict[str, int]:
    """Held Runs per process actor."""
    return {a["slot"]: a["held"] for a in rt.status()["actors"] if a["role"] == "process" and a["held"]}


def _runs(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _hold_one(rt: cpsl.Runtime, running: cpsl.Task, tmp_path: Path
              ) -> tuple[cpsl.TaskHandle, int, cpsl.TaskHandle, Path, Path]:
    """``running`` (a gated task) on p0, then a ``mark`` held behind it: (handle, its pid, held
    handle, gate, the held task's log)."""
    gate, started, log = tmp_path / "gate", tmp_path / "started", tmp_path / "log"
    first = running.submit(str(gate), str(started))
    wait_until(started.exists)
    held = mark.submit(str(log))
    wait_until(lambda: _held(rt) == {"p0": 1})
    return first, int(started.read_text()), held, gate, log


def test_a_held_run_waits_its_turn_and_counts_as_queued(start, tmp_path):
    rt = start(app, process_workers=1)
    gate, started, log = tmp_path / "gate", tmp_path / "started", tmp_path / "log"
    first = gated.submit(str(gate), str(started))
    wait_until(started.exists)
    second = mark.submit(str(log))
    third = mark.submit(str(log) + ".3")
    wait_until(lambda: _held(rt) == {"p0": 2})  # sent ahead to the busy actor
    assert rt.status()["tasks"] == {"RUNNING": 1, "QUEUED": 2}  # held is not running
    assert _actor(rt, "p0")["running"] == 1
    for h in (second, third):
        info = h.info()
        assert (info.state, info.attempts) == ("QUEUED", 0)  # no attempt until it begins
    assert not log.exists()
    gate.touch()
    pid = first.result(timeout=30)
    assert second.result(timeout=30) == third.result(timeout=30) == pid  # the same process, right after
    assert second.info().attempts == third.info().attempts == 1 and _runs(log) == [pid]


def test_cancelling_a_held_run_leaves_the_running_task_alone(start, tmp_path):
    rt = start(app, process_workers=1)
    first, pid, held, gate, log = _hold_one(rt, gated, tmp_path)
    assert held.cancel()
    with pytest.raises(cpsl.TaskCancelled):
        held.result(timeout=10)
    wait_until(lambda: not _held(rt))
    gate.touch()
    assert first.result(timeout=30) == pid  # not killed: the cancel was not about it
    assert mark.submit(str(tmp_path / "after")).result(timeout=30) == pid
    assert not log.exists()  # the cancelled one never ran
    assert _actor(rt, "p0")["pid"] == pid and _actor(rt, "p0")["restarts"] == 0


def test_a_crash_charges_the_running_task_not_the_held_one(start, tmp_path):
    rt = start(app, process_workers=1)
    doomed, crashed_pid, held, gate, log = _hold_one(rt, crashes_at_gate, tmp_path)
    gate.touch()
    with pytest.raises(cpsl.WorkerCrashed):
        doomed.result(timeout=30)
    pid = held.result(timeout=30)
    assert pid != crashed_pid  # it ran on the replacement process
    assert held.info().attempts == 1 and _runs(log) == [pid]  # the crash did not count against it
    assert _actor(rt, "p0")["restarts"] == 1


def test_a_held_runs_timeout_starts_when_it_begins(start, tmp_path):
    """Held longer than its timeout=1.0 s behind another task: not timed out, and the task
    it waited behind is not killed."""
    rt = start(app, process_workers=1)
    gate, started = tmp_path / "gate", tmp_path / "started"
    first = gated.submit(str(gate), str(started), 1.5)  # past its gate, it works 1.5 s more
    wait_until(started.exists)
    held = brief.submit(0.1)
    wait_until(lambda: _held(rt) == {"p0": 1})
    gate.touch()  # the first ends 1.5 s from now: past the held Run's timeout, had it started
    assert first.result(timeout=30) == int(started.read_text())
    assert held.result(timeout=30) == "done"
    info = held.info()
    assert info.attempts == 1
    assert info.started_at - info.created_at > 1.5  # it was held longer than its timeout


def test_a_held_run_moves_to_an_actor_that_frees_up(start, tmp_path):
    """A long task must not keep a short one waiting while another process actor is idle."""
    rt = start(app, process_workers=2)
    gates = [tmp_path / "gate0", tmp_path / "gate1"]
    started = [tmp_path / "started0", tmp_path / "started1"]
    long_ones = [gated.submit(str(g), str(s)) for g, s in zip(gates, started)]
    wait_until(lambda: all(s.exists() for s in started))
    log = tmp_path / "log"
    short = mark.submit(str(log))
    holder = next(iter(wait_until(lambda: _held(rt))))
    holder_pid = _actor(rt, holder)["pid"]
    free = next(i for i, s in enumerate(started) if int(s.read_text()) != holder_pid)
    gates[free].touch()  # the other actor finishes its task; the holder stays busy
    freed_pid = long_ones[free].result(timeout=30)
    assert short.result(timeout=10) == freed_pid  # taken back from the busy one and run there
    assert _runs(log) == [freed_pid] and short.info().attempts == 1
    gates[1 - free].touch()
    assert long_ones[1 - free].result(timeout=30) == holder_pid


def _grow_holding_one(rt: cpsl.Runtime, grower: cpsl.Task, tmp_path: Path, *, seen_growing: bool
                      ) -> tuple[int, int, cpsl.TaskHandle, Path]:
    """``grower`` (200 MB, past ``limited``'s 120) on p0 with a ``mark`` held behind it; its gate
    opens once the memory check has marked p0 stopping (``seen_growing``) or at once. Returns
    (the grower's pid, the held task's pid, its handle, its log)."""
    gate, log = tmp_path / "gate", tmp_path / "log"
    big = grower.submit(200, str(gate))
    wait_until(lambda: _actor(rt, "p0")["running"] == 1)
    held = limited_mark.submit(str(log))
    wait_until(lambda: _held(rt) == {"p0": 1})
    if seen_growing:
        wait_until(lambda: _actor(rt, "p0")["state"] == "stopping")  # the memory check saw it grow
    gate.touch()
    return big.result(timeout=30), held.result(timeout=30), held, log


def test_an_actor_recycled_while_holding_a_run_gives_it_back(start, tmp_path):
    """Past max_process_memory_mb the actor is told to stop after its task: the Run it holds is
    not run there but given back, and runs once on the replacement."""
    rt = start(limited, process_workers=1)
    big_pid, pid, held, log = _grow_holding_one(rt, grow, tmp_path, seen_growing=True)
    assert pid != big_pid
    assert held.info().attempts == 1 and _runs(log) == [pid]
    assert _actor(rt, "p0")["restarts"] == 0


def test_a_process_that_grew_past_its_limit_in_its_last_moments_begins_no_held_run(start, tmp_path):
    """The task grows past max_process_memory_mb just before it ends, so no periodic memory check
    saw it running: the actor does not begin the Run it holds, the supervisor's check at the Done
    recycles it, and the held Run runs on the replacement (once, never in the bloated process)."""
    rt = start(limited, process_workers=1)
    big_pid, pid, held, log = _grow_holding_one(rt, grow_at_the_end, tmp_path, seen_growing=False)
    assert pid != big_pid
    assert held.info().attempts == 1 and _runs(log) == [pid]
    assert _actor(rt, "p0")["restarts"] == 0  # recycled, not crashed


def test_a_graceful_stop_gives_held_runs_back_for_the_next_start(start, tmp_path):
    """Stop while a process actor runs one task past the grace and holds another: neither
    attempt counts, and the next start runs each once."""
    rt = start(app, process_workers=1, grace=0.5)
    first, _, held, gate, log = _hold_one(rt, gated, tmp_path)
    rt.stop()  # the running one is killed at the grace and re-queued; the held one is given back
    assert not log.exists()
    gate.touch()
    start(app, process_workers=1)  # the same state directory
    pid = first.result(timeout=30)
    assert held.result(timeout=30) == pid
    assert first.info().attempts == held.info().attempts == 1 and _runs(log) == [pid]


budgeted = cpsl.App("held-budget", max_tasks_per_process=2)
budgeted_gated = budgeted.task(process=True, name="gated")(gated.fn)
budgeted_mark = budgeted.task(process=True, name="mark")(mark.fn)


def test_no_process_runs_more_than_max_tasks_per_process_with_runs_held(start, tmp_path):
    """SPEC: recycled after max_tasks_per_process tasks. A process is never sent, ahead, a Run
    it would have to run past that count."""
    start(budgeted, process_workers=1)
    gate, started, log = tmp_path / "gate", tmp_path / "started", tmp_path / "log"
    first = budgeted_gated.submit(str(gate), str(started))
    wait_until(started.exists)
    rest = [budgeted_mark.submit(str(log)) for _ in range(5)]
    gate.touch()
    pids = [first.result(timeout=30)] + [h.result(timeout=30) for h in rest]
    assert max(pids.count(pid) for pid in set(pids)) == 2, pids
    assert sorted(_runs(log)) == sorted(pids[1:])  # each ran once

