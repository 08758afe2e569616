"""Lock-key routing: one owner actor per key decides join / queue / reject without a race."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, wait_until

import capsule_actors as cpsl
from capsule_actors.supervisor.router import owner

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("locks")
HERE = Path(__file__).resolve().parent


def _append(path: str, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text + "\n")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@app.task(lock="report:{report_id}")
async def build_report(report_id: int, log: str, seconds: float = 0.5) -> int:
    _append(log, f"run {report_id}")
    await asyncio.sleep(seconds)
    return report_id


@app.task(lock="gated:{report_id}")
async def gated_report(report_id: int, log: str, gate: str) -> int:
    """Runs until ``gate`` exists: every client's submit must find it running, however slowly the
    clients start (a fixed run time made the test depend on the machine's load)."""
    _append(log, f"run {report_id}")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return report_id


@app.task(lock="sync:{key}", on_conflict="queue")
async def one_at_a_time(key: str, i: int, log: str) -> int:
    _append(log, f"start {i} {time.time():.6f}")
    await asyncio.sleep(0.05)
    _append(log, f"end {i} {time.time():.6f}")
    return i


@app.task(lock="only:{key}", on_conflict="reject")
async def exclusive(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return key


@app.task(lock="const-key")
async def constant(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@app.task(lock="spread:{i}")
async def spread(i: int) -> int:
    return i


@app.task(lock="outcome:{key}", retries=0, timeout=0.3)
async def finishes(key: str, how: str) -> str:
    if how == "fail":
        raise ValueError("failing on purpose")
    if how == "sleep":
        await asyncio.sleep(30)
    return how


@app.task(lock="crash:{key}", retries=1, backoff=cpsl.Backoff(initial=0.0, jitter=False))
async def crashy(key: str, log: str) -> str:
    _append(log, f"run {os.getpid()}")
    await asyncio.sleep(1.0)
    return "survived"


@app.task(lock="proc:{key}", process=True)
def isolated(key: str, seconds: float, log: str) -> int:
    _append(log, "run")
    time.sleep(seconds)
    return os.getpid()


def test_owner_is_stable_and_spreads_keys():
    slots = ["w0", "w1", "w2", "w3"]
    owners = collections.Counter(owner(f"key-{i}", slots) for i in range(1000))
    assert set(owners) == set(slots)
    assert max(owners.values()) <= 2 * 1000 / len(slots)
    assert all(owner(f"key-{i}", slots) == owner(f"key-{i}", list(slots)) for i in range(100))


def test_concurrent_submits_from_threads_run_the_body_once(start, tmp_path):
    start(app, workers=2)
    log = tmp_path / "runs"
    # Given 50 threads submitting the same key at once
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        handles = list(pool.map(lambda _: build_report.submit(7, str(log)), range(50)))
    # Then every handle names one task, all but one deduplicated, and the body ran once
    assert len({h.id for h in handles}) == 1
    assert sum(not h.deduplicated for h in handles) == 1
    assert all(h.lock_key == "report:7" for h in handles)
    assert {h.result(timeout=30) for h in handles} == {7}
    assert _lines(log) == ["run 7"]


CLIENT = """
import sys, json
sys.path[:0] = [{here!r}]
import test_locks as t
t.app.state_dir = {state!r}
hs = [t.gated_report.submit(11, {log!r}, {gate!r}) for _ in range(50)]
print(json.dumps(sorted({{h.id for h in hs}})))
"""


def test_concurrent_submits_from_four_processes_join_one_task(start, state_dir, tmp_path):
    start(app, workers=2)
    log, gate = tmp_path / "runs", tmp_path / "gate"
    code = CLIENT.format(here=str(HERE), state=str(state_dir), log=str(log), gate=str(gate))
    clients = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    try:
        ids = [json.loads(p.communicate(timeout=60)[0]) for p in clients]
    finally:
        gate.touch()
        for p in clients:
            p.kill()
            p.wait()
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 1
    assert cpsl.TaskHandle.from_id(app, ids[0][0]).result(timeout=30) == 11
    assert _lines(log) == ["run 11"]


def test_queue_runs_one_at_a_time_in_submit_order(start, tmp_path):
    start(app, workers=2)
    log = tmp_path / "runs"
    handles = [one_at_a_time.submit("a", i, str(log)) for i in range(8)]
    assert len({h.id for h in handles}) == 8 and not any(h.deduplicated for h in handles)
    assert [h.result(timeout=30) for h in handles] == list(range(8))
    events = [line.split() for line in _lines(log)]
    assert [e[1] for e in events if e[0] == "start"] == [str(i) for i in range(8)]
    # no overlap: each run ends before the next starts
    starts = {int(e[1]): float(e[2]) for e in events if e[0] == "start"}
    ends = {int(e[1]): float(e[2]) for e in events if e[0] == "end"}
    assert all(ends[i] <= starts[i + 1] for i in range(7))


def test_reject_raises_lock_conflict_and_records_nothing(start):
    rt = start(app, workers=2)
    first = exclusive.submit("x", 0.5)
    before = rt.status()["tasks"]
    with pytest.raises(cpsl.LockConflict, match="only:x"):
        exclusive.submit("x", 0.5)
    assert rt.status()["tasks"] == before
    assert first.result(timeout=30) == "x"
    assert exclusive.submit("x", 0.0).result(timeout=30) == "x"  # free again


def test_constant_key_is_valid(start):
    start(app)
    a, b = constant.submit(0.3), constant.submit(0.3)
    assert a.id == b.id and b.deduplicated and a.lock_key == "const-key"
    assert b.result(timeout=30) == "done"


def test_thousand_keys_spread_over_the_actors(start):
    rt = start(app, workers=4)
    handles = spread.map(list(range(1000)))
    assert [h.result(timeout=60) for h in handles[:5]] == [0, 1, 2, 3, 4]
    rows = json.loads(cli("tasks", "--json", "--limit", "1000", state_dir=rt.state_dir, check=True).stdout)
    slots = collections.Counter(r["owner"] for r in rows)
    assert set(slots) == {"w0", "w1", "w2", "w3"}
    assert max(slots.values()) <= 2 * 1000 / 4
    # the task ran on the slot that owns its key
    assert all(r["slot"] == r["owner"] for r in rows)


@pytest.mark.parametrize("how", ["ok", "fail", "timeout", "cancel"])
def test_key_is_released_after_every_outcome(start, how):
    start(app)
    h = finishes.submit("k", "sleep" if how in ("timeout", "cancel") else how)
    if how == "cancel":
        wait_until(lambda: h.status() == cpsl.TaskState.RUNNING)
        assert h.cancel()
    with pytest.raises(Exception) if how != "ok" else _nothing():
        h.result(timeout=30)
    # a new submit of the same key is a new task that runs
    again = wait_until(lambda: _fresh(finishes.submit("k", "ok"), h.id), timeout=10)
    assert again.result(timeout=30) == "ok"


def _fresh(handle: cpsl.TaskHandle, old_id: str) -> cpsl.TaskHandle | None:
    return handle if handle.id != old_id else None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_owner_sigkill_retries_holding_the_key_and_duplicates_still_join(start, tmp_path):
    rt = start(app, workers=2)
    log = tmp_path / "runs"
    h = crashy.submit("c", str(log))
    wait_until(lambda: len(_lines(log)) == 1)
    slot = h.info().slot
    victim = next(a["pid"] for a in rt.status()["actors"] if a["slot"] == slot)
    # When the owner actor dies mid-run
    os.kill(victim, signal.SIGKILL)
    # Then a duplicate submitted during the restart still joins the same task
    dup = crashy.submit("c", str(log))
    assert dup.id == h.id and dup.deduplicated
    assert h.result(timeout=30) == "survived"
    info = h.info()
    assert info.attempts == 2 and info.slot == slot
    assert len(_lines(log)) == 2
    # And after the key is released a new submit runs
    wait_until(lambda: next(a for a in rt.status()["actors"] if a["slot"] == slot)["state"] == "ready")
    again = crashy.submit("c", str(log))
    assert again.id != h.id and not again.deduplicated


def test_process_tasks_are_deduplicated_too(start, tmp_path):
    start(app, process_workers=2)
    log = tmp_path / "runs"
    a = isolated.submit("p", 0.5, str(log))
    b = isolated.submit("p", 0.5, str(log))
    assert b.id == a.id and b.deduplicated
    assert a.result(timeout=30) == b.result(timeout=30)
    assert _lines(log) == ["run"]


def test_status_and_tasks_show_the_key_and_its_owner(start, tmp_path):
    rt = start(app, workers=2)
    h = build_report.submit(3, str(tmp_path / "runs"), 1.0)
    rows = json.loads(cli("tasks", "--json", state_dir=rt.state_dir, check=True).stdout)
    row = next(r for r in rows if r["id"] == h.id)
    assert row["lock_key"] == "report:3" and row["owner"] == owner("report:3", ["w0", "w1"])
    status = json.loads(cli("status", "--json", state_dir=rt.state_dir, check=True).stdout)
    keys = {a["slot"]: a["keys"] for a in status["actors"]}
    assert keys[row["owner"]] == 1
    assert h.result(timeout=30) == 3
