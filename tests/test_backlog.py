"""A deep queue lives in SQLite, not in the supervisor's memory: past QUEUE_WINDOW queued tasks,
new ones stay in the store only and are paged in, in submit order, as the queue drains."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors.supervisor.intake import QUEUE_WINDOW

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("backlog", max_queued=1_000_000)
N = QUEUE_WINDOW * 5 // 2


@app.task(retries=2)  # the ones running when the supervisor is killed run again
async def gated(i: int, gate: str) -> int:
    while not os.path.exists(gate):
        await asyncio.sleep(0.02)
    return i


def _sup(rt: cpsl.Runtime) -> dict:
    return rt.status()["supervisor"]


def test_a_deep_queue_stays_in_the_store_and_drains_in_order(start, tmp_path: Path):
    rt = start(app, workers=1, process_workers=1)
    gate = str(tmp_path / "gate")
    handles = gated.map([(i, gate) for i in range(N)])
    sup = _sup(rt)
    assert sup["live_tasks"] == N
    assert sup["in_memory"] <= QUEUE_WINDOW + 200 and sup["backlog"] >= N - QUEUE_WINDOW - 200
    counts = rt.status()["tasks"]
    assert counts.get("QUEUED", 0) + counts.get("RUNNING", 0) == N

    # backlog tasks get no pushed outcome (nothing per task in the supervisor's RAM); a wait on
    # one is parked, a cancel of one works, nothing runs early
    last, cancelled = handles[-1], handles[-2]
    assert handles[0]._push is not None and last._push is None
    box: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: box.update(value=last.result(timeout=120)), daemon=True)
    waiter.start()
    assert cancelled.cancel()
    with pytest.raises(cpsl.TaskCancelled):
        cancelled.result(timeout=10)
    assert _sup(rt)["live_tasks"] == N - 1

    Path(gate).touch()
    results = [h.result(timeout=120) for h in handles[:-2]]
    assert results == list(range(N - 2))
    waiter.join(60)
    assert box["value"] == N - 1
    assert cancelled.info().started_at is None  # cancelled while in the backlog: never ran
    first, paged = handles[0].info(), handles[-3].info()
    assert first.started_at is not None and paged.started_at is not None and first.started_at < paged.started_at
    sup = wait_until(lambda: (lambda s: s if s["live_tasks"] == 0 else None)(_sup(rt)), 30)
    assert sup["in_memory"] == 0 and sup["backlog"] == 0


def test_a_backlog_survives_a_supervisor_kill_and_is_paged_in_again(start, state_dir, tmp_path: Path):
    rt = start(app, workers=1, process_workers=1)
    gate = str(tmp_path / "gate")
    handles = gated.map([(i, gate) for i in range(N)])
    assert _sup(rt)["backlog"] > 0
    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)
    rt2 = start(app, workers=1, process_workers=1)
    sup = _sup(rt2)
    assert sup["live_tasks"] == N and sup["backlog"] >= N - QUEUE_WINDOW - 200
    Path(gate).touch()
    assert [h.result(timeout=120) for h in handles] == list(range(N))
    assert wait_until(lambda: _sup(rt2)["live_tasks"] == 0, 30)


@app.task(lock="k:{key}")
async def keyed(key: str) -> str:
    return key


def test_a_routing_key_too_long_for_a_header_is_refused_before_anything_is_sent(start):
    rt = start(app, workers=1, process_workers=1)
    with pytest.raises(cpsl.ConfigError, match="lock key and session id"):
        keyed.map(["short", "x" * 70_000])
    assert _sup(rt)["live_tasks"] == 0 and not rt.status()["tasks"]
    assert keyed.submit("short").result(timeout=30) == "short"
