"""Flow control decided in the supervisor's dispatch: priorities (live, and from the store after
a supervisor SIGKILL), per-submit options, concurrency limits, global and per-key rate limits.
Start times are recorded by the task bodies themselves, in files, so every check reads what
really happened in the actors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, append_line, wait_until

import capsule_actors as cpsl
from capsule_actors.supervisor.intake import QUEUE_WINDOW

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("limits", max_queued=100_000)
TESTS = Path(__file__).resolve().parent


def _lines(log: str) -> list[list[str]]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [line.split() for line in f.read().splitlines()]


async def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.02)


@app.task(concurrency=1, retries=2)
async def one_at_a_time(label: str, log: str, gate: str) -> None:
    append_line(log, f"{label} {time.time()}")
    await _wait_for(gate)


@app.task(concurrency=2)
async def two_at_a_time(i: int, log: str) -> None:
    append_line(log, f"start {time.time()} {i}")
    await asyncio.sleep(0.15)
    append_line(log, f"end {time.time()} {i}")


@app.task(rate_limit="20/s")
async def twenty_a_second(i: int, log: str) -> int:
    append_line(log, f"{time.time()} {i}")
    return i


@app.task(rate_limit=cpsl.RateLimit("5/s", key="tenant:{tenant}"))
async def per_tenant(tenant: str, i: int, log: str) -> None:
    append_line(log, f"{time.time()} {tenant}")


@app.task
async def gated_start(label: str, log: str, gate: str) -> None:
    append_line(log, label)
    await _wait_for(gate)


@app.task
async def takes_priority(priority: int, delay: float) -> tuple[int, float]:
    return priority, delay


def _max_in_window(times: list[float], width: float) -> int:
    """The most start times in any half-open window [t, t + width) (a sliding check)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ---- bad values --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"rate_limit": "ten/s"}, "'ten/s'"),
        ({"rate_limit": "0/s"}, "'0/s'"),
        ({"rate_limit": "5/d"}, "'5/d'"),
        ({"rate_limit": cpsl.RateLimit}, "RateLimit"),
        ({"concurrency": -1}, "concurrency=-1"),
        ({"concurrency": 0}, "concurrency=0"),
        ({"priority": "high"}, "priority='high'"),
        ({"priority": True}, "priority=True"),
    ],
)
def test_bad_limits_are_refused_at_decoration_naming_the_value(options: dict, named: str):
    other = cpsl.App("bad-values")
    with pytest.raises(cpsl.ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")) as caught:
        other.task(**options)(lambda: None)
    assert named in str(caught.value)
    assert not other.tasks


def test_bad_options_and_key_templates_are_refused_before_anything_is_sent():
    other = cpsl.App("bad-options", state_dir="/nonexistent/never/used")

    @other.task
    async def job(x: int) -> None: ...

    with pytest.raises(cpsl.ConfigError, match="priority='high'"):
        job.options(priority="high")
    with pytest.raises(cpsl.ConfigError, match="delay=-1"):
        job.options(delay=-1)
    with pytest.raises(cpsl.ConfigError, match="ten/s"):
        cpsl.RateLimit("ten/s")
    with pytest.raises(cpsl.ConfigError, match=r"\{tenant\}, which is not a parameter"):
        other.task(rate_limit=cpsl.RateLimit("1/s", key="t:{tenant}"), name="keyed")(lambda x: x)
    with pytest.raises(cpsl.ConfigError, match=r"needs .*options\(delay"):
        job.options(priority=1).schedule(1)


# ---- priorities --------------------------------------------------------------------------------
def _mixed(n: int) -> list[tuple[int, int]]:
    """(index, priority) in submit order: priorities -3..9 spread over the submits."""
    return [(i, (i * 7) % 13 - 3) for i in range(n)]


def _expected(items: list[tuple[int, int]]) -> list[str]:
    return [f"t{i}" for i, _ in sorted(items, key=lambda ip: (-ip[1], ip[0]))]


def test_queued_tasks_start_by_priority_then_in_submit_order(start, tmp_path: Path):
    """200 tasks queued behind a running one start highest priority first, ties in submit order."""
    rt = start(app, workers=1, process_workers=1)
    log, gate = str(tmp_path / "starts"), str(tmp_path / "gate")
    # Given a blocker holding the task's one concurrency slot
    blocker = one_at_a_time.options(priority=-100).submit("blocker", log, str(tmp_path / "blocker-gate"))
    wait_until(lambda: _lines(log), 30)
    # When 200 tasks of mixed priorities queue behind it (options() per submit, with a kwarg named
    # like an option going to the task itself)
    items = _mixed(200)
    handles = [one_at_a_time.options(priority=p).submit(f"t{i}", log, gate=gate) for i, p in items]
    wait_until(lambda: rt.status()["tasks"].get("QUEUED", 0) >= 200, 30)
    Path(gate).touch()
    Path(tmp_path / "blocker-gate").touch()
    # Then they start in priority order, first in first out within a priority
    for h in handles:
        h.result(timeout=60)
    blocker.result(timeout=30)
    started = [label for label, _ in _lines(log)]
    assert started[0] == "blocker"
    assert started[1:] == _expected(items)


def test_delayed_tasks_coming_due_start_by_priority(start, tmp_path: Path):
    """Delayed tasks (in the store only until due) keep their priority when the clock hands them over."""
    rt = start(app, workers=1, process_workers=1)
    log, gate, blocker_gate = str(tmp_path / "starts"), str(tmp_path / "gate"), str(tmp_path / "blocker-gate")
    blocker = one_at_a_time.submit("blocker", log, blocker_gate)
    wait_until(lambda: _lines(log), 30)
    items = _mixed(40)
    handles = [one_at_a_time.options(priority=p, delay=0.3).submit(f"t{i}", log, gate) for i, p in items]
    assert {h.status() for h in handles} <= {cpsl.TaskState.SCHEDULED, cpsl.TaskState.QUEUED}
    wait_until(lambda: rt.status()["tasks"].get("QUEUED", 0) >= 40, 30)  # due, behind the blocker
    Path(gate).touch()
    Path(blocker_gate).touch()
    cpsl.wait_all([blocker, *handles], timeout=60)
    assert [label for label, _ in _lines(log)][1:] == _expected(items)


def test_queued_order_by_priority_comes_from_the_store_after_a_supervisor_kill(start, tmp_path: Path):
    """SIGKILL the supervisor with 200 prioritized tasks queued: the next one starts them in
    priority order (the store keeps each task's priority)."""
    log, gate = str(tmp_path / "starts"), str(tmp_path / "gate")
    rt = start(app, workers=1, process_workers=1)
    one_at_a_time.submit("blocker", log, gate)
    wait_until(lambda: _lines(log), 30)
    items = _mixed(200)
    for i, p in items:
        one_at_a_time.options(priority=p).submit(f"t{i}", log, gate)
    wait_until(lambda: rt.status()["tasks"].get("QUEUED", 0) >= 200, 30)
    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)
    Path(gate).touch()
    os.unlink(log)

    start(app, workers=1, process_workers=1)  # the blocker is re-run too (a retry), in its place
    wait_until(lambda: len(_lines(log)) >= 201, 90)
    started = [label for label, _ in _lines(log) if label != "blocker"]
    assert started == _expected(items)


def test_a_high_priority_backlog_starts_before_a_window_full_of_low_priority(start, tmp_path: Path):
    """More than QUEUE_WINDOW tasks of each of two priorities: the window is per priority, so
    the high ones paged in from the store all start before the low ones held in memory."""
    rt = start(app, workers=1, process_workers=1)
    log, gate = str(tmp_path / "starts"), str(tmp_path / "gate")
    n = QUEUE_WINDOW + 500
    low = gated_start.map([(f"low{i}", log, gate) for i in range(n)])
    high = gated_start.options(priority=1).map([(f"high{i}", log, gate) for i in range(n)])
    assert rt.status()["supervisor"]["backlog"] >= 2 * 300  # both priorities have one
    Path(gate).touch()
    cpsl.wait_all(low + high, timeout=240)
    started = [label for (label,) in _lines(log)]
    first_high = started.index("high0")
    assert first_high <= 200  # the low ones that started before the high ones came
    rest = started[first_high:]
    assert rest[:n] == [f"high{i}" for i in range(n)]
    assert started[:first_high] + rest[n:] == [f"low{i}" for i in range(n)]


def test_options_never_clash_with_the_tasks_own_keyword_arguments(start):
    start(app, workers=1, process_workers=1)
    h = takes_priority.options(priority=3).submit(priority=7, delay=0.5)
    assert h.result(timeout=30) == [7, 0.5] or h.result(timeout=30) == (7, 0.5)
    hs = takes_priority.options(priority=-1).map([(1, 0.0), {"priority": 2, "delay": 1.0}])
    assert [tuple(h.result(timeout=30)) for h in hs] == [(1, 0.0), (2, 1.0)]
    later = takes_priority.options(delay=0.3).submit(5, 0.0)
    assert later.status() == cpsl.TaskState.SCHEDULED
    assert tuple(later.result(timeout=30)) == (5, 0.0)


# ---- concurrency -------------------------------------------------------------------------------
def test_a_concurrency_limit_never_shows_more_overlapping_runs(start, tmp_path: Path):
    """concurrency=2 on 2 worker actors that could run 200 at once: never 3 bodies at a time."""
    start(app, workers=2, process_workers=1)
    log = str(tmp_path / "runs")
    handles = two_at_a_time.map([(i, log) for i in range(16)])
    for h in handles:
        h.result(timeout=60)
    events = sorted((float(t), kind == "start") for kind, t, _ in _lines(log))
    assert len(events) == 32
    running = peak = 0
    for _, starts in events:  # at equal times an end sorts first: touching runs do not overlap
        running += 1 if starts else -1
        peak = max(peak, running)
    assert peak == 2


# ---- rate limits -------------------------------------------------------------------------------
CLIENT = """
import sys
sys.path[:0] = [{tests!r}]
import test_limits as t
hs = t.twenty_a_second.map([(i, {log!r}) for i in range({first}, {first} + 100)])
assert [h.result(timeout=120) for h in hs] == list(range({first}, {first} + 100))
"""


def test_a_global_rate_limit_holds_across_clients_in_every_one_second_window(start, state_dir, tmp_path: Path):
    """rate_limit="20/s", 300 tasks from 3 client processes: never more than 20 starts in any
    1-second window of the start times the actors recorded, and done in about 15 s."""
    start(app, workers=2, process_workers=1)
    log = str(tmp_path / "starts")
    env = dict(os.environ, CAPSULE_STATE_DIR=str(state_dir), PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    began = time.monotonic()
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT.format(tests=str(TESTS), log=log, first=first)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for first in (0, 100, 200)
    ]
    try:
        for client in clients:
            _, err = client.communicate(timeout=150)
            assert client.returncode == 0, err.decode()[-2000:]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(10)
    took = time.monotonic() - began
    starts = [float(t) for t, _ in _lines(log)]
    assert sorted(int(i) for _, i in _lines(log)) == list(range(300))
    assert _max_in_window(starts, 1.0) <= 20
    assert max(starts) - min(starts) >= 13.0 and took <= 40.0, (took, max(starts) - min(starts))


def test_a_keyed_rate_limit_keeps_each_keys_budget_apart(start, tmp_path: Path):
    """RateLimit("5/s", key="tenant:{tenant}"): each tenant gets 5 starts a second, both at once."""
    start(app, workers=1, process_workers=1)
    log = str(tmp_path / "starts")
    handles = per_tenant.map([(tenant, i, log) for i in range(20) for tenant in ("a", "b")])
    wait_until(lambda: len(_lines(log)) >= 10, 30)
    info = handles[-1].info()  # held back: still QUEUED, and saying why
    assert info.state == cpsl.TaskState.QUEUED
    assert info.waiting_for is not None and info.waiting_for.startswith("rate limited until ")
    assert info.rate_limited_until is not None and 0 < info.rate_limited_until - time.time() < 10
    assert "rate limited until " in str(cpsl.ui.TaskCard(info))
    for h in handles:
        h.result(timeout=60)
    assert handles[-1].info().waiting_for is None  # done: no longer held
    by_tenant = {t: [float(ts) for ts, who in _lines(log) if who == t] for t in ("a", "b")}
    assert len(by_tenant["a"]) == len(by_tenant["b"]) == 20
    assert _max_in_window(by_tenant["a"], 1.0) <= 5
    assert _max_in_window(by_tenant["b"], 1.0) <= 5
    # the two budgets are apart: together they start more than one budget allows
    assert _max_in_window(by_tenant["a"] + by_tenant["b"], 1.0) >= 8


# ---- dead letters ------------------------------------------------------------------------------
@app.task
async def always_fails(i: int) -> None:
    raise ValueError(f"bad {i}")


@app.task
async def hangs(gate: str) -> None:
    await _wait_for(gate)


@app.task
async def fails_until(path: str, i: int) -> int:
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing")
    return i


@app.on_failure
def alert(task_id: str, name: str, error_type: str, error_message: str, traceback: str) -> None:
    log = os.environ.get("LIMITS_HOOK_LOG")  # set by the test that counts the hook's runs
    if log:
        append_line(log, f"{task_id} {name} {error_type} {os.getpid()}")


def test_on_failure_runs_once_per_dead_task_across_a_supervisor_kill(start, tmp_path: Path, monkeypatch):
    """The hook runs in a worker actor once for each task that failed for good: neither a
    supervisor SIGKILL after it ran nor the recovery that fails a crashed task runs it twice."""
    hook_log = str(tmp_path / "hook")
    monkeypatch.setenv("LIMITS_HOOK_LOG", hook_log)
    rt = start(app, workers=1, process_workers=1)
    failing = always_fails.map(range(5))
    hung = hangs.submit(str(tmp_path / "never"))
    wait_until(lambda: len(_lines(hook_log)) == 5 and hung.status() == cpsl.TaskState.RUNNING, 30)
    actors = {int(pid) for *_, pid in _lines(hook_log)}
    assert rt.pid not in actors  # run by an actor, not the supervisor
    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)

    rt2 = start(app, workers=1, process_workers=1)  # the hung task crashed out: no retry left
    with pytest.raises(cpsl.WorkerCrashed):
        hung.result(timeout=30)
    wait_until(lambda: len(_lines(hook_log)) >= 6, 30)
    wait_until(lambda: rt2.status()["supervisor"]["live_tasks"] == 0, 30)
    seen = {task_id: (name, error) for task_id, name, error, _ in _lines(hook_log)}
    assert len(_lines(hook_log)) == 6 == len(seen)
    assert seen == {
        **{h.id: ("always_fails", "ValueError") for h in failing},
        hung.id: ("hangs", "WorkerCrashed"),
    }


def test_dead_letters_are_listed_and_retried_from_the_cli(start, state_dir, tmp_path: Path):
    from conftest import cli

    start(app, workers=1, process_workers=1)
    missing = str(tmp_path / "missing")
    dead = fails_until.map([(missing, i) for i in range(3)])
    other = always_fails.submit(9)
    for h in [*dead, other]:
        with pytest.raises((RuntimeError, ValueError)):
            h.result(timeout=30)

    listed = cli("tasks", "--dead", "--name", "fails_until", "--json", state_dir=state_dir, check=True)
    assert sorted(t["id"] for t in json.loads(listed.stdout)) == sorted(h.id for h in dead)
    everything = json.loads(cli("tasks", "--dead", "--json", state_dir=state_dir, check=True).stdout)
    assert other.id in {t["id"] for t in everything}

    Path(missing).touch()
    one = cli("retry", dead[0].id[-10:], state_dir=state_dir, check=True)
    old, _, _, new = one.stdout.split()
    assert old == dead[0].id[-10:] and new != dead[0].id
    assert cpsl.TaskHandle.from_id(app, new).result(timeout=30) == 0
    again = cli("retry", dead[0].id, state_dir=state_dir)  # once only: it names the retry
    assert again.returncode == 1 and new in again.stderr

    rest = cli("retry", "--all-dead", "--name", "fails_until", state_dir=state_dir, check=True)
    retried = dict(line.split(" retried as ") for line in rest.stdout.splitlines())
    assert set(retried) == {h.id for h in dead[1:]}
    assert sorted(cpsl.TaskHandle.from_id(app, n).result(timeout=30) for n in retried.values()) == [1, 2]
    assert "2 of 3 dead 'fails_until' tasks retried" in rest.stderr
    none_left = cli("retry", "--all-dead", "--name", "fails_until", state_dir=state_dir, check=True)
    assert none_left.stdout == ""
