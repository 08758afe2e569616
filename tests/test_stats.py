"""The board's Stats view from the store (``StoreReader.stats_rows`` and ``ui/stats.py``), on
both stores: throughput by outcome, queue depth and run-time percentiles per task name, crashed
attempts and actor restarts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors import store, testing
from capsule_actors.ui.stats import stats

STORES = ("sqlite", "postgresql")

app = cpsl.App("stats-tests")
NOW = cpsl.Backoff(initial=0.0)


@app.task
async def ok(x: int) -> int:
    return x


@app.task
async def bad() -> None:
    raise ValueError("bad")


@app.task(process=True)
def gated(gate: str) -> str:
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "through"


@app.task(retries=1, backoff=NOW)
async def crashes_once() -> str:
    return "back"


def read(state_dir: Path, store_url: str | None, window: str = "hour") -> dict[str, Any]:
    reader = store.open_reader(state_dir, store_url, app.name)
    assert reader is not None
    try:
        return stats(reader, window, time.time())
    finally:
        reader.close()


def test_stats_count_what_ran(start: Any, state_dir: Path, store_url: str | None, tmp_path: Path) -> None:
    runtime = start(app, workers=1, process_workers=1)
    # Given an empty store, the view is all zeros
    empty = read(state_dir, store_url)
    assert len(empty["buckets"]) == 60 and empty["step"] == 60.0
    assert all(sum(series) == 0 for series in empty["throughput"].values())
    assert empty["run_time"] == [] and sum(empty["crashes"]) == 0 and sum(empty["restarts"]) == 0

    # When 3 process tasks wait behind a gate (one runs, the others queue) ...
    gate = tmp_path / "gate"
    held = [gated.submit(str(gate)) for _ in range(4)]

    def three_queued() -> dict[str, Any] | None:
        view = read(state_dir, store_url)
        return view if view["queue"].get("gated", [0])[-1] == 3 else None

    view = wait_until(three_queued)
    # ... then the last bucket's queue depth says so
    assert view["queue"]["gated"][-1] == 3
    gate.touch()
    assert testing.join(held, timeout=60) == ["through"] * 4

    # and 5 successes, 2 failures and a crash followed by a successful retry
    assert testing.join([ok.submit(i) for i in range(5)], timeout=30) == list(range(5))
    for h in [bad.submit(), bad.submit()]:
        with pytest.raises(ValueError):
            h.result(timeout=30)
    testing.crash_on_attempt(crashes_once, attempt=1)
    assert crashes_once.submit().result(timeout=30) == "back"

    # Then the counts per outcome, the queue drained, run times per name, one crash
    view = read(state_dir, store_url)
    per_state = {state: round(sum(series) * view["step"]) for state, series in view["throughput"].items()}
    assert per_state == {"SUCCEEDED": 4 + 5 + 1, "FAILED": 2, "CANCELLED": 0}
    assert view["queue"]["gated"][-1] == 0  # depth at the end of each bucket; the last one ends now
    run_time = {r["name"]: r for r in view["run_time"]}
    assert {name: r["n"] for name, r in run_time.items()} == {"gated": 4, "ok": 5, "bad": 2, "crashes_once": 1}
    assert 0 <= run_time["ok"]["p50"] <= run_time["ok"]["p99"] < 5
    assert sum(view["crashes"]) == 1 and sum(view["restarts"]) == 1  # the crash killed its actor: restarted
    # an idle actor killed from outside is a restart too, with no crashed attempt
    rt = runtime
    victim = next(a for a in rt.status()["actors"] if a["slot"] == "p0")
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: sum(read(state_dir, store_url)["restarts"]) == 2)
    assert sum(read(state_dir, store_url)["crashes"]) == 1

    # and the day's window cuts the same tasks in quarter hours
    day = read(state_dir, store_url, "day")
    assert len(day["buckets"]) == 96 and round(sum(day["throughput"]["SUCCEEDED"]) * 900) == 10


def test_an_unknown_window_is_refused(start: Any, state_dir: Path, store_url: str | None) -> None:
    start(app, workers=1, process_workers=1)
    with pytest.raises(cpsl.ConfigError, match="window='week': expected one of hour, day"):
        read(state_dir, store_url, "week")
