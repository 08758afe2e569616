"""Workflows (chain, group, chord) with real supervisors and actors: results, failure and
on_error, cancel, bad input, and exactly-once continuation across supervisor SIGKILLs. Each step
notes its own starts in a file, so every check reads what really ran in the actors."""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import append_line, wait_until

import capsule_actors as cpsl

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("workflows")
other = cpsl.App("other")
FAST = cpsl.Backoff(initial=0.0)


def _lines(log: str) -> list[str]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return f.read().splitlines()


@app.task()
def add(x: int, y: int) -> int:
    return x + y


@app.task()
def total(xs: list[int]) -> int:
    return sum(xs)


@app.task()
def pair(xs: list[int], tag: str) -> list[object]:
    return [tag, xs]


@app.task(retries=10, backoff=FAST)
async def step(prev: int, log: str, label: str) -> int:
    append_line(log, label)
    await asyncio.sleep(random.uniform(0.05, 0.3))
    return prev + 1


@app.task(retries=10, backoff=FAST, lock="k:{key}", on_conflict="queue")
async def locked_step(prev: int, key: str, log: str, label: str) -> int:
    append_line(log, label)
    await asyncio.sleep(random.uniform(0.05, 0.3))
    return prev + 1


@app.task(retries=10, backoff=FAST)
async def member(i: int, log: str, label: str) -> int:
    append_line(log, label)
    await asyncio.sleep(random.uniform(0.05, 0.3))
    return i * i


@app.task(retries=10, backoff=FAST)
def callback(results: list[int], log: str, label: str, runs: str) -> int:
    append_line(log, label)
    Path(runs, f"{label}-{uuid.uuid4().hex}").touch()  # one file per run of this callback
    return sum(results)


@app.task()
def fails(x: int) -> int:
    raise ValueError(f"member {x} failed")


@app.task()
def on_error(step_id: str, error: str, log: str) -> None:
    append_line(log, f"{step_id} {error}")


@app.task()
async def waits(gate: str, log: str) -> int:
    append_line(log, "started")
    while not os.path.exists(gate):
        await asyncio.sleep(0.02)
    return 1


@app.task()
async def passes_on(prev: int, gate: str, log: str) -> int:
    await waits(gate, log)
    return prev


@app.task()
def no_input() -> int:
    return 0


@app.task(process=True)
def crunch(n: int) -> int:
    return n * 3


@app.task()
async def tell(value: int, session: cpsl.Session | None = None) -> int:
    assert session is not None
    await session.notify(f"got {value}")
    return value


small = cpsl.App("workflows-small", max_payload_bytes=4096)


@small.task()
def blob(i: int) -> bytes:
    return bytes(2000)


@small.task()
def count(blobs: list[bytes]) -> int:
    return len(blobs)


@other.task()
def foreign(x: int) -> int:
    return x


# ---- locked steps: each run notes "start LABEL T" and "end LABEL T" (T: the system's monotonic clock)
def _runs(log: str) -> dict[str, list[tuple[float, float]]]:
    """label -> the (start, end) of each run that ended (a run cut short by a kill has no end)."""
    began: dict[str, float] = {}
    runs: dict[str, list[tuple[float, float]]] = {}
    for line in _lines(log):
        what, label, at = line.split()
        if what == "start":
            began[label] = float(at)
        else:
            runs.setdefault(label, []).append((began.pop(label), float(at)))
    return runs


def _no_overlap(runs: list[tuple[float, float]]) -> None:
    runs = sorted(runs)
    for (_, end), (start, _) in itertools.pairwise(runs):
        assert end <= start, runs


async def _run_noted(log: str, label: str, gate: str | None = None) -> None:
    append_line(log, f"start {label} {time.monotonic()}")
    await asyncio.sleep(0.1)
    while gate is not None and not os.path.exists(gate):
        await asyncio.sleep(0.02)
    append_line(log, f"end {label} {time.monotonic()}")


@app.task(lock="slot:{name}", on_conflict="queue")
async def guarded(prev: int, name: str, log: str, label: str) -> int:
    await _run_noted(log, label)
    return prev + 1


@app.task(lock="slot:{name}", on_conflict="queue")
async def guarded_first(name: str, log: str, label: str) -> int:
    await _run_noted(log, label)
    return 0


@app.task(lock="door", on_conflict="queue", retries=3, backoff=FAST)
async def holds(log: str, label: str, gate: str) -> int:
    await _run_noted(log, label, gate)
    return 7


@app.task(lock="door", on_conflict="reject")
async def knocks(prev: int, log: str) -> int:
    await _run_noted(log, "knocks")
    return prev


@app.task(lock="door", on_conflict="join")
async def joins(prev: int, log: str) -> int:
    await _run_noted(log, "joins")
    return prev


@app.task(lock="door", on_conflict="queue")
async def waits_turn(prev: int, log: str) -> int:
    await _run_noted(log, "waits_turn")
    return prev + 1


@app.task(lock="n:{prev}")
def keyed_by_input(prev: int) -> int:
    return prev


def _wait_event(handle: cpsl.TaskHandle, kind: str, timeout: float = 30.0) -> cpsl.TaskEvent:
    """The first event of ``kind`` of a live task (its stream long-polls: read in a thread, so
    that the wait has a deadline)."""
    found: queue.Queue[cpsl.TaskEvent | None] = queue.Queue()

    def scan() -> None:
        try:
            found.put(next((e for e in handle.events() if e.kind == kind), None))
        except Exception:
            found.put(None)

    threading.Thread(target=scan, daemon=True).start()
    try:
        event = found.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no {kind!r} event of task {handle.id} within {timeout} s")
    assert event is not None, f"task {handle.id} ended without a {kind!r} event"
    return event


def test_a_chain_a_chord_and_their_nesting_give_the_right_results(start):
    start(app, workers=2, process_workers=1)
    three = cpsl.chain(add.s(1, 2), add.s(10), add.s(100)).submit()
    assert three.result(timeout=30) == 113
    assert [h.result(timeout=5) for h in three.steps()] == [3, 13, 113]
    assert three.status() == cpsl.TaskState.SUCCEEDED

    hundred = cpsl.chord(cpsl.group([add.s(i, i) for i in range(100)]), total.s()).submit()
    assert hundred.result(timeout=60) == sum(2 * i for i in range(100))
    assert len(hundred.steps()) == 101

    # a chain of groups, and a chord inside a chain (its members take the previous value first)
    flow = cpsl.chain(
        add.s(1, 1), cpsl.group([add.s(1), add.s(2), cpsl.chain(add.s(3), add.s(4))]), pair.s("g")
    ).submit()
    assert flow.result(timeout=30) == ["g", [3, 4, 9]]
    inner = cpsl.chain(add.s(1, 1), cpsl.chord([add.s(5), add.s(6)], total.s()), add.s(100)).submit()
    assert inner.result(timeout=30) == 115
    assert cpsl.group([add.s(i, 1) for i in range(5)]).submit().result(timeout=30) == [1, 2, 3, 4, 5]

    again = cpsl.FlowHandle.from_id(app, flow.id)
    assert [h.id for h in again.steps()] == [h.id for h in flow.steps()]
    assert again.result(timeout=5) == ["g", [3, 4, 9]]
    kinds = [e.kind for e in flow.events()]
    assert kinds.count("flow") == 1 and kinds.count("step") == 6 and kinds[-1] == "state"


def test_a_failing_member_cancels_the_callback_and_runs_on_error_once(start, tmp_path: Path):
    log = str(tmp_path / "errors")
    start(app, workers=2, process_workers=1)
    flow = cpsl.chain(
        cpsl.chord([add.s(1, 1), fails.s(2), add.s(3, 3)], total.s()),
        add.s(1),
        on_error=on_error.s(log),
    ).submit()
    with pytest.raises(ValueError, match="member 2 failed"):
        flow.result(timeout=30)
    assert flow.status() == cpsl.TaskState.FAILED
    wait_until(lambda: len(_lines(log)) == 1, 30)
    steps = flow.steps()
    failed = steps[1]
    assert _lines(log) == [f"{failed.id} ValueError: member 2 failed"]
    wait_until(lambda: all(h.done() for h in steps), 30)
    callback_info, after_info = steps[3].info(), steps[4].info()
    assert callback_info.state == after_info.state == cpsl.TaskState.CANCELLED
    assert callback_info.error is not None and failed.id in callback_info.error[1]
    time.sleep(0.3)  # nothing runs the handler a second time
    assert len(_lines(log)) == 1

    ok = cpsl.chain(add.s(1, 1), add.s(1), on_error=on_error.s(log)).submit()
    assert ok.result(timeout=30) == 3
    wait_until(lambda: ok.steps()[-1].done(), 30)
    assert ok.steps()[-1].status() == cpsl.TaskState.CANCELLED  # no step failed: the handler never ran
    assert len(_lines(log)) == 1


def test_cancel_of_a_running_chord_cancels_every_step_not_finished(start, tmp_path: Path):
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    start(app, workers=2, process_workers=1)
    flow = cpsl.chord([waits.s(gate, log) for _ in range(4)], total.s()).submit()
    wait_until(lambda: len(_lines(log)) == 4, 30)
    assert flow.status() == cpsl.TaskState.RUNNING
    assert flow.cancel() is True
    with pytest.raises(cpsl.TaskCancelled):
        flow.result(timeout=30)
    wait_until(lambda: all(h.status() == cpsl.TaskState.CANCELLED for h in flow.steps()), 30)
    assert flow.cancel() is False


def test_bad_input_raises_config_error_before_anything_is_recorded(start):
    rt = start(app, workers=1, process_workers=1)
    bad = [
        lambda: cpsl.chain(add.s(1, 2), foreign.s()).submit(),  # a task of another app
        lambda: cpsl.chord(cpsl.group([add.s(1, 2)])),  # no callback
        lambda: cpsl.group([]),  # empty
        lambda: cpsl.chain(add.s(1, 2, 3)).submit(),  # too many arguments
        lambda: cpsl.chain(add.s(1, 2), no_input.s()).submit(),  # no parameter for the input
        lambda: cpsl.chain(add.s(1, 2), "not a step"),
    ]
    for make in bad:
        with pytest.raises(cpsl.ConfigError):
            make()
    assert rt.status()["supervisor"]["live_tasks"] == 0
    assert cpsl.chain(add.s(1, 2)).submit().result(timeout=30) == 3


def test_supervisor_sigkills_lose_no_workflow_and_start_no_step_twice(start, tmp_path: Path):
    """20 chords and 20 chains (their second steps locked, three keys among them), the supervisor
    SIGKILLed at random moments while they run: every
    workflow ends with the right value, and no step (callbacks included: one file per run) ran
    more often than its attempts allow. A Run may leave before the commit that records its
    attempt (docs/architecture.md, group commit): a kill in between re-runs it under the same
    attempt number, so each kill may add one start uncounted by ``attempts``, never more."""
    log, runs = str(tmp_path / "starts"), tmp_path / "runs"
    runs.mkdir()
    rng = random.Random(20)
    rt = start(app, workers=2, process_workers=1)
    chords: list[cpsl.FlowHandle] = []
    chains: list[cpsl.FlowHandle] = []
    kills = 0
    deadline = time.monotonic() + 60
    while kills < 8 and time.monotonic() < deadline:  # submit in waves, so kills hit every phase
        for k in range(len(chords), min(20, len(chords) + 5)):
            members = [member.s(i, log, f"c{k}.m{i}") for i in range(5)]
            chords.append(cpsl.chord(members, callback.s(log, f"c{k}.cb", str(runs))).submit())
            rest = [step.s(log, f"s{k}.{j}") for j in range(2, 5)]  # the second step is locked (3 keys)
            second = locked_step.s(f"{k % 3}", log, f"s{k}.1")
            chains.append(cpsl.chain(step.s(0, log, f"s{k}.0"), second, *rest).submit())
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(rt.pid, signal.SIGKILL)
        rt.process.wait(10)
        kills += 1
        rt = start(app, workers=2, process_workers=1)
    assert len(chords) == len(chains) == 20
    for k, flow in enumerate(chords):
        assert flow.result(timeout=60) == sum(i * i for i in range(5)), k
    for flow in chains:
        assert flow.result(timeout=60) == 5
    starts: dict[str, int] = {}
    for label in _lines(log):
        starts[label] = starts.get(label, 0) + 1
    for k, flow in enumerate(chords):
        labels = [f"c{k}.m{i}" for i in range(5)] + [f"c{k}.cb"]
        for label, handle in zip(labels, flow.steps()):
            assert 1 <= starts.get(label, 0) <= handle.info().attempts + kills, (label, kills)
        files = [p for p in runs.iterdir() if p.name.startswith(f"c{k}.cb-")]
        assert 1 <= len(files) == starts[f"c{k}.cb"]
    for k, flow in enumerate(chains):
        for j, handle in enumerate(flow.steps()):
            assert 1 <= starts.get(f"s{k}.{j}", 0) <= handle.info().attempts + kills
    for flow in chords + chains:  # one step event per step: none replayed by a restart
        assert [e.kind for e in flow.events()].count("step") == len(flow.steps())
    reruns = sum(max(0, n - 1) for n in starts.values())
    assert reruns >= 1  # the kills did cut running steps short


def test_the_cli_prints_a_workflow_as_a_tree_and_groups_it_in_tasks(start, state_dir: Path, tmp_path: Path):
    from conftest import cli

    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    start(app, workers=2, process_workers=1)
    flow = cpsl.chain(add.s(1, 2), cpsl.chord([add.s(1), passes_on.s(gate, log)], total.s()), add.s(10)).submit()
    wait_until(lambda: len(_lines(log)) == 1, 30)
    first, plus, waiting, cb, last = flow.steps()
    tree = cli("flow", flow.id[-8:], state_dir=state_dir, check=True).stdout.splitlines()
    assert tree[0].split() == ["workflow", flow.id[-8:], "RUNNING"]  # as status() says (its record waits)
    lines = {line.split()[0]: line.split() for line in tree[2:]}
    assert lines[first.id[-8:]][1:3] == ["add", "SUCCEEDED"]
    assert lines[waiting.id[-8:]][1:3] == ["passes_on", "RUNNING"]
    assert lines[cb.id[-8:]][1:5] == ["total", "SCHEDULED", "0", f"[{plus.id[-8:]},"]
    assert lines[last.id[-8:]][4] == cb.id[-8:]

    listed = cli("tasks", state_dir=state_dir, check=True).stdout.splitlines()
    assert listed[1].split()[:7] == [flow.id[-8:], "flow:", "5", "steps,", "1", "running", "RUNNING"]  # one line
    assert [line.split()[1] for line in listed[2:7]] == [h.id[-8:] for h in flow.steps()]
    Path(gate).touch()
    assert flow.result(timeout=30) == (3 + 1) + 3 + 10


def test_steps_run_as_any_task_process_isolated_with_options_and_bound_to_the_session(start):
    start(app, workers=1, process_workers=1)
    chat = cpsl.Session("chat-20")
    flow = cpsl.chain(crunch.s(2), tell.options(priority=5).s(), tell.s()).submit(session=chat)
    assert flow.result(timeout=30) == 6
    assert all(h.info().session_id == "chat-20" for h in flow.steps())
    assert flow.steps()[0].info().slot == "p0"  # process=True: a process-isolated actor ran it
    notes = []
    for event in app.subscribe("chat-20", timeout=30):
        if event.kind == "notify":
            notes.append((event.task_id, event.data["text"]))
        if len(notes) == 2:
            break
    assert notes == [(flow.steps()[1].id, "got 6"), (flow.steps()[2].id, "got 6")]


def test_a_signatures_options_reach_its_step():
    from capsule_actors.flows import _Compiler

    compiler = _Compiler(app, None)
    compiler.node(cpsl.chain(add.options(priority=7).s(1, 2), add.s(1)), None)
    (first, _), (second, _) = compiler.items
    assert (first[1], first[6], second[6]) == ("add", 7, 0)
    with pytest.raises(cpsl.ConfigError):
        add.options(delay=5).s(1, 2)


def test_inputs_too_large_for_a_run_fail_the_step_without_running_it(start):
    start(small, workers=1, process_workers=1)
    assert cpsl.chord([blob.s(1)], count.s()).submit().result(timeout=30) == 1
    flow = cpsl.chord([blob.s(i) for i in range(3)], count.s()).submit()
    with pytest.raises(cpsl.CapsuleError, match="max_payload_bytes=4096"):
        flow.result(timeout=30)
    callback_info = flow.steps()[-1].info()
    assert callback_info.state == cpsl.TaskState.FAILED and callback_info.attempts == 0
    assert callback_info.error is not None and callback_info.error[0] == "SerializationError"


def test_locked_steps_of_different_workflows_never_overlap_on_their_key(start, tmp_path: Path):
    """Chains and a group whose steps share one lock key (queue): every step runs, one at a time."""
    log = str(tmp_path / "runs")
    start(app, workers=2, process_workers=1)
    chains = [
        cpsl.chain(guarded_first.s("shared", log, f"w{k}.0"), guarded.s("shared", log, f"w{k}.1")).submit()
        for k in range(3)
    ]
    members = cpsl.group([guarded.s(i, "shared", log, f"g.{i}") for i in range(2)]).submit()
    for flow in chains:
        assert flow.result(timeout=60) == 1
    assert members.result(timeout=60) == [1, 2]
    runs = _runs(log)
    assert sorted(runs) == sorted([f"w{k}.{j}" for k in range(3) for j in range(2)] + ["g.0", "g.1"])
    assert all(len(r) == 1 for r in runs.values())
    _no_overlap([run for label_runs in runs.values() for run in label_runs])
    step = chains[0].steps()[1].info()
    assert step.lock_key == "slot:shared" and step.attempts == 1


def test_a_locked_step_is_admitted_as_a_submit_reject_join_and_queue(start, tmp_path: Path):
    """Given a task holding the key "door": a step that would reject fails its workflow with
    LockConflict without running; one that joins ends with the holder's result (and releases the
    next step); one that queues runs after the holder, never with it."""
    log, gate = str(tmp_path / "runs"), str(tmp_path / "gate")
    start(app, workers=2, process_workers=1)
    holder = holds.submit(log, "holder", gate)
    wait_until(lambda: _lines(log), 30)

    rejected = cpsl.chain(add.s(1, 2), knocks.s(log), add.s(10)).submit()
    with pytest.raises(cpsl.LockConflict, match=r"'door'.*" + holder.id):
        rejected.result(timeout=30)
    refused = rejected.steps()[1].info()
    assert refused.state == cpsl.TaskState.FAILED and refused.attempts == 0
    assert refused.error is not None and refused.error[0] == "LockConflict"
    assert refused.lock_key == "door"
    assert rejected.steps()[2].status() == cpsl.TaskState.CANCELLED

    joined = cpsl.chain(add.s(1, 2), joins.s(log), add.s(10)).submit()
    queued = cpsl.chain(add.s(1, 2), waits_turn.s(log)).submit()
    _wait_event(joined.steps()[1], "joined")
    wait_until(lambda: queued.steps()[1].info().lock_key == "door", 30)  # admitted: queued behind the holder
    assert queued.steps()[1].status() == cpsl.TaskState.QUEUED
    Path(gate).touch()
    assert holder.result(timeout=30) == 7
    assert joined.result(timeout=30) == 17  # the holder's 7, then + 10
    assert queued.result(timeout=30) == 4
    joiner = joined.steps()[1].info()
    assert (joiner.state, joiner.attempts, joined.steps()[1].result(timeout=5)) == (cpsl.TaskState.SUCCEEDED, 0, 7)
    runs = _runs(log)
    assert "knocks" not in runs and "joins" not in runs
    _no_overlap(runs["holder"] + runs["waits_turn"])


def test_a_lock_key_that_names_the_input_is_refused_at_submit(start):
    start(app, workers=1, process_workers=1)
    with pytest.raises(cpsl.ConfigError, match=r"keyed_by_input.*\{prev\}"):
        cpsl.chain(add.s(1, 2), keyed_by_input.s()).submit()
    assert cpsl.chain(keyed_by_input.s(5), add.s(1)).submit().result(timeout=30) == 6  # a first step's is known
    assert cpsl.group([keyed_by_input.s(i) for i in range(3)]).submit().result(timeout=30) == [0, 1, 2]


def test_locked_steps_queued_and_joined_survive_a_supervisor_sigkill(start, tmp_path: Path):
    """A step queued behind its key's holder and one that joined it, when the supervisor is
    SIGKILLed (its actors die with it): after the restart the holder runs again, the queued step
    runs once and after it (though its workflow was recorded before the holder: a step takes its
    place for the key when it is admitted), and the joined one ends with the holder's result."""
    log, gate = str(tmp_path / "runs"), str(tmp_path / "gate")
    first_log, first_gate = str(tmp_path / "first"), str(tmp_path / "first-gate")
    rt = start(app, workers=2, process_workers=1)
    queued = cpsl.chain(waits.s(first_gate, first_log), waits_turn.s(log), add.s(100)).submit()
    wait_until(lambda: _lines(first_log) == ["started"], 30)
    holder = holds.submit(log, "holder", gate)
    wait_until(lambda: _lines(log), 30)
    Path(first_gate).touch()
    wait_until(lambda: queued.steps()[1].info().lock_key == "door", 30)  # admitted: queued behind the holder
    joined = cpsl.chain(add.s(1, 2), joins.s(log), add.s(10)).submit()
    _wait_event(joined.steps()[1], "joined")

    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)
    start(app, workers=2, process_workers=1)
    wait_until(lambda: sum(line.startswith("start holder") for line in _lines(log)) == 2, 30)  # run again
    Path(gate).touch()
    assert holder.result(timeout=30) == 7
    assert queued.result(timeout=30) == 102
    assert joined.result(timeout=30) == 17
    runs = _runs(log)
    assert len(runs["holder"]) == 1 and len(runs["waits_turn"]) == 1 and "joins" not in runs
    assert runs["holder"][0][1] <= runs["waits_turn"][0][0]
    assert joined.steps()[1].info().attempts == 0


def test_asubmit_returns_the_handle_of_a_chain_a_chord_a_group_and_a_signature(start):
    start(app, workers=2, process_workers=1)

    async def main() -> list[object]:
        flows = [
            await cpsl.chain(add.s(1, 2), add.s(10)).asubmit(),
            await cpsl.chord([add.s(i, i) for i in range(5)], total.s()).asubmit(),
            await cpsl.group([add.s(1, 1), add.s(2, 2)]).asubmit(),
            await add.s(2, 3).asubmit(),
        ]
        assert all(isinstance(flow, cpsl.FlowHandle) for flow in flows)
        return list(await asyncio.wait_for(asyncio.gather(*flows), 30))

    assert asyncio.run(main()) == [13, 20, [2, 4], 5]
