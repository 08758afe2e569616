"""The Python API of SPEC section 2: declaring, submitting, handles, events, map, async twins,
fan-out, sessions, lock keys and delayed tasks -- all against a real runtime."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_until

import capsule_actors as cpsl

TESTS_DIR = Path(__file__).resolve().parent

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("api-tests")


# ---- tasks (module level, so the registry travels to the supervisor) -----------------------

@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task()
def mul(x: int, y: int) -> int:
    return x * y


@app.task
async def square(n: int) -> int:
    return n * n


@app.task
def actor_pid() -> int:
    return os.getpid()


@app.task
async def gated(gate: str, value: int) -> int:
    """Runs until the file ``gate`` exists (bounded), then returns ``value``."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        await asyncio.sleep(0.02)
    return value


@app.task
async def fan_out(n: int) -> int:
    """Submits n children from inside a running task and awaits them."""
    handles = [square.submit(i) for i in range(n)]
    return sum([await h for h in handles])


@app.task
async def with_session(tag: str, session: cpsl.Session | None = None):
    current = cpsl.current_session()
    return tag, session, current


@app.task
def plain_current_session() -> cpsl.Session | None:
    return cpsl.current_session()


@app.task(lock="report:{report_id}")
async def build_report(report_id: int = 7, fmt: str = "pdf") -> str:
    return f"report {report_id}.{fmt}"


@app.task(lock="report:{report_id}:{fmt}")
async def build_formatted(report_id: int, fmt: str = "pdf") -> str:
    return f"{report_id}.{fmt}"


@app.task(lock="singleton")
async def singleton_job() -> str:
    return "only one"


@cpsl.task
def default_app_bare(x: int) -> int:
    return x + 100


@cpsl.task(name="test_api_default_app_named", retries=1)
def default_app_parens(x: int) -> int:
    return x + 200


# ---- declaring ----------------------------------------------------------------------------

def test_task_decorator_with_and_without_parentheses_registers_tasks():
    # Given tasks declared as @app.task and @app.task(), both are Task objects in the registry
    assert isinstance(add, cpsl.Task) and isinstance(mul, cpsl.Task)
    assert app.tasks["add"] is add
    assert app.tasks["mul"] is mul
    assert add.name == "add" and mul.name == "mul"
    # the wrapper keeps the function's identity for introspection
    assert add.__name__ == "add" and add.__doc__ == add.fn.__doc__


def test_cpsl_task_registers_on_the_default_app():
    assert cpsl.default_app.tasks["default_app_bare"] is default_app_bare
    assert cpsl.default_app.tasks["test_api_default_app_named"] is default_app_parens
    assert default_app_bare.app is cpsl.default_app
    assert default_app_parens.retries == 1
    assert "default_app_bare" not in app.tasks
    # and they are plain callables too
    assert default_app_bare(1) == 101 and default_app_parens(1) == 201


def test_duplicate_task_name_is_a_config_error():
    other = cpsl.App("dup-tests")

    @other.task(name="same")
    def first() -> int:
        return 1

    def second() -> int:
        return 2

    with pytest.raises(cpsl.ConfigError, match="same"):
        other.task(name="same")(second)
    # the first registration is untouched
    assert other.tasks["same"] is first


def test_calling_a_task_directly_runs_the_plain_function_in_the_caller(state_dir):
    # No runtime is running: a direct call must not need one.
    assert not state_dir.exists()
    assert asyncio.run(add(2, 3)) == 5
    assert mul(4, 5) == 20
    assert actor_pid() == os.getpid()
    assert asyncio.run(with_session("t")) == ("t", None, None)


# ---- submit, result, handles --------------------------------------------------------------

def test_submit_and_result_for_async_and_plain_tasks(start):
    rt = start(app)
    h_async = add.submit(2, 3)
    h_plain = mul.submit(6, y=7)
    assert isinstance(h_async, cpsl.TaskHandle)
    assert h_async.name == "add" and h_plain.name == "mul"
    assert h_async.id != h_plain.id
    assert h_async.lock_key is None and h_async.deduplicated is False
    assert h_async.result(timeout=30) == 5
    assert h_plain.result(timeout=30) == 42
    # the plain def ran in an actor, not here
    pid = actor_pid.submit().result(timeout=30)
    assert pid != os.getpid() and pid in {a["pid"] for a in rt.status()["actors"]}


def test_await_handle_inside_asyncio_run(start):
    start(app)

    async def main():
        h1 = add.submit(10, 20)          # a sync submit, awaited
        h2 = await mul.asubmit(3, 3)     # an async submit, awaited
        return await h1, await h2

    assert asyncio.run(main()) == (30, 9)


def test_done_status_and_info_fields(start, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    # Given a task held at a gate
    h = gated.submit(str(gate), 11)
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING, timeout=30)
    # Then it is not done, and its info says RUNNING with a start time but no end
    assert h.done() is False
    running = h.info()
    assert running.state is cpsl.TaskState.RUNNING
    assert running.started_at is not None and running.finished_at is None
    assert running.attempts == 1
    # When the gate opens, it finishes
    gate.touch()
    assert h.result(timeout=30) == 11
    assert h.done() is True
    assert h.status() is cpsl.TaskState.SUCCEEDED
    assert h.status() == "SUCCEEDED"
    info = h.info()
    assert isinstance(info, cpsl.TaskInfo)
    assert info.id == h.id
    assert info.name == "gated"
    assert info.state is cpsl.TaskState.SUCCEEDED
    assert info.attempts == 1
    assert info.lock_key is None and info.session_id is None
    assert info.error is None
    assert info.created_at <= info.started_at <= info.finished_at
    assert abs(info.created_at - time.time()) < 120


def test_task_state_values():
    assert [s.value for s in cpsl.TaskState] == [
        "QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    assert {s for s in cpsl.TaskState if s.terminal} == {
        cpsl.TaskState.SUCCEEDED, cpsl.TaskState.FAILED, cpsl.TaskState.CANCELLED}


def _states(events: list[cpsl.TaskEvent]) -> list[str]:
    return [e.data["state"] for e in events if e.kind == "state"]


def test_events_sync_iteration_queued_running_succeeded_then_stops(start):
    start(app)
    h = add.submit(1, 1)
    events = list(h.events())  # must end by itself once the task is over
    assert _states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert all(e.task_id == h.id for e in events)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert h.result(timeout=30) == 2
    # iterating again after the end replays the history and stops
    assert _states(list(h.events())) == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_events_async_iteration(start, tmp_path):
    start(app)
    gate = tmp_path / "gate"

    async def main():
        h = await gated.asubmit(str(gate), 5)
        seen = []
        async for event in h.events():
            seen.append(event)
            if event.kind == "state" and event.data["state"] == "RUNNING":
                gate.touch()  # events arrive live, while the task runs
        return h, seen

    h, seen = asyncio.run(asyncio.wait_for(main(), 60))
    assert _states(seen) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert h.result(timeout=30) == 5


def test_from_id_in_a_separate_process_returns_the_result(start, tmp_path):
    rt = start(app)
    gate = tmp_path / "gate"
    h = gated.submit(str(gate), 99)
    # Given another process that knows only the task id and the state directory
    script = tmp_path / "reattach.py"
    script.write_text(
        "import json, sys\n"
        "import capsule_actors as cpsl\n"
        "import test_api\n"
        "h = cpsl.TaskHandle.from_id(test_api.app, sys.argv[1])\n"
        "print(json.dumps({'name': h.name, 'status': str(h.status())}), flush=True)\n"
        "print(json.dumps({'result': h.result(timeout=60), 'status': str(h.status())}), flush=True)\n"
    )
    env = dict(os.environ, CAPSULE_STATE_DIR=str(rt.state_dir),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS_DIR)]))
    proc = subprocess.Popen([sys.executable, str(script), h.id], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # When it re-attaches while the task still runs, then opens the gate
        first = json.loads(_readline(proc, timeout=60))
        assert first["name"] == "gated"
        assert first["status"] in ("QUEUED", "RUNNING")
        gate.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    # Then it gets the task's result
    assert json.loads(out.strip().splitlines()[-1]) == {"result": 99, "status": "SUCCEEDED"}
    assert h.result(timeout=30) == 99


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or fail the test after ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no output from the child within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"the child exited early: {proc.stderr.read() if proc.stderr else ''}")
    return line


# ---- map and the async twins --------------------------------------------------------------

def test_map_returns_one_handle_per_item_in_order(start):
    start(app)
    tuples = add.map([(1, 2), (3, 4), (5, 6)])
    dicts = mul.map([{"x": 2, "y": 3}, {"x": 4, "y": 5}])
    singles = square.map([1, 2, 3, 4])
    assert [h.name for h in tuples] == ["add"] * 3
    assert len({h.id for h in tuples + dicts + singles}) == 9
    assert [h.result(timeout=30) for h in tuples] == [3, 7, 11]
    assert [h.result(timeout=30) for h in dicts] == [6, 20]
    assert [h.result(timeout=30) for h in singles] == [1, 4, 9, 16]
    assert add.map([]) == []


def test_submits_and_questions_in_one_drain_see_each_other(start):
    """The supervisor records the Submits of one drain with one insert; a Wait or Info right
    behind them in the same drain must still find their tasks. The supervisor is stopped
    (SIGSTOP) while the burst is sent, so that it reads all of it in one drain."""
    import signal

    import cloudpickle
    import zmq

    from capsule_actors import messages
    from capsule_actors.app import new_task_id
    from capsule_actors.transport import read_runtime_file

    rt = start(app)
    add.submit(0, 0).result(timeout=30)  # running, and the task name known
    info = read_runtime_file(rt.state_dir)
    assert info is not None
    ids = [new_task_id() for _ in range(40)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    os.kill(info.pid, signal.SIGSTOP)
    try:
        sock.connect(info.client)
        for req, task_id in enumerate(ids, 1):
            item = [task_id, "add", None, None, None, None]
            payload = cloudpickle.dumps(((req, 1000), {}), protocol=5)
            sock.send_multipart([messages.Submit(req, [item], [], False).encode(), payload])
        sock.send_multipart([messages.Wait(100, ids[0]).encode()])
        sock.send_multipart([messages.Info(101, [ids[-1]]).encode()])
    finally:
        os.kill(info.pid, signal.SIGCONT)
    try:
        replies: dict[int, list] = {}
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + 30
        while len(replies) < len(ids) + 2 and time.monotonic() < deadline:
            if poller.poll(500):
                frames = sock.recv_multipart()
                reply = messages.decode(frames[0])
                assert isinstance(reply, messages.Reply)
                replies[reply.req] = [reply.ok, reply.body, frames[1:]]
    finally:
        sock.close(0)
        ctx.term()
    assert sorted(replies) == [*range(1, len(ids) + 1), 100, 101]
    acks = [replies[req] for req in range(1, len(ids) + 1)]
    assert all(ok for ok, _, _ in acks) and [body["items"][0][0] for _, body, _ in acks] == ids
    ok, body, frames = replies[100]  # the first task's outcome, not "no task with id ..."
    assert ok and body[0] == "SUCCEEDED" and cloudpickle.loads(frames[0]) == 1001, body
    ok, body, _ = replies[101]
    assert ok and body[0] is not None and body[0]["id"] == ids[-1], body
    again = [cpsl.TaskHandle.from_id(app, i) for i in ids]
    assert [h.result(timeout=30) for h in again] == [r + 1000 for r in range(1, 41)]


def test_asubmit_and_amap_from_an_event_loop(start):
    start(app)

    async def main():
        h = await add.asubmit(4, 4)
        hs = await square.amap([5, 6, (7,)])
        return await h, [await x for x in hs]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (8, [25, 36, 49])


def test_asubmit_never_blocks_the_event_loop(start):
    """300 concurrent asubmits (and their awaits) while a ticker measures the loop's stalls.

    A blocking asubmit would run all 300 round trips inside one loop step: one long stall, and
    the ticker would not tick while they are in flight."""
    start(app)

    async def main():
        gaps: list[float] = []
        stop, ticking = asyncio.Event(), asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                ticking.set()

        tick = asyncio.create_task(ticker())
        await ticking.wait()  # the ticker runs (bounded by main's wait_for)
        ticks_before = len(gaps)
        handles = await asyncio.gather(*(add.asubmit(i, 1) for i in range(300)))
        ticks_during_submits = len(gaps) - ticks_before
        results = await asyncio.gather(*handles)
        stop.set()
        await tick
        return handles, results, gaps, ticks_during_submits

    handles, results, gaps, ticks_during_submits = asyncio.run(asyncio.wait_for(main(), 90))
    assert len({h.id for h in handles}) == 300
    assert results == [i + 1 for i in range(300)]
    # blocking submits would leave no tick at all (300 round trips in one loop step); on a loaded
    # 2-core machine the ticker may get only a few turns, so one is the bar
    assert ticks_during_submits >= 1, "the loop did not run while the submits were in flight"
    assert max(gaps) < 0.25, f"event loop stalled for {max(gaps):.3f} s"


def test_submit_from_inside_a_running_task_fan_out(start):
    rt = start(app)
    # Given a task that submits 10 children and awaits them with `await h`
    h = fan_out.submit(10)
    # Then it returns the sum of their results
    assert h.result(timeout=60) == sum(i * i for i in range(10))
    # and the children were real tasks of the runtime: 1 parent + 10 children succeeded
    assert rt.status()["tasks"] == {"SUCCEEDED": 11}


# ---- sessions -----------------------------------------------------------------------------

def test_session_is_passed_and_current_session_returns_it(start):
    start(app)
    chat = cpsl.Session("chat-1")
    tag, session, current = with_session.submit("a", session=chat).result(timeout=30)
    assert tag == "a"
    assert isinstance(session, cpsl.Session) and session.id == "chat-1"
    assert current == session
    # a plain def task in the thread pool sees it too
    inner = plain_current_session.submit(session=cpsl.Session("chat-2")).result(timeout=30)
    assert isinstance(inner, cpsl.Session) and inner.id == "chat-2"
    # the record carries the session id
    h = add.submit(1, 2, session=chat)
    assert h.result(timeout=30) == 3
    assert h.info().session_id == "chat-1"


def test_unbound_session_is_none_and_the_task_still_runs(start):
    start(app)
    assert with_session.submit("b").result(timeout=30) == ("b", None, None)
    assert plain_current_session.submit().result(timeout=30) is None


# ---- lock keys ----------------------------------------------------------------------------

def test_lock_key_is_formatted_from_bound_arguments_with_defaults(start):
    start(app)
    h = build_report.submit()  # report_id defaults to 7
    assert h.lock_key == "report:7"
    assert h.result(timeout=30) == "report 7.pdf"
    assert h.info().lock_key == "report:7"
    h = build_report.submit(report_id=8, fmt="csv")
    assert h.lock_key == "report:8"
    assert h.result(timeout=30) == "report 8.csv"
    h = build_formatted.submit(3)
    assert h.lock_key == "report:3:pdf"
    assert h.result(timeout=30) == "3.pdf"


def test_constant_lock_string_is_a_valid_key(start):
    start(app)
    h = singleton_job.submit()
    assert h.lock_key == "singleton"
    assert h.result(timeout=30) == "only one"
    assert h.info().lock_key == "singleton"


def test_lock_template_field_not_a_parameter_fails_at_decoration():
    other = cpsl.App("lock-config")
    with pytest.raises(cpsl.ConfigError, match="report_id"):
        @other.task(lock="report:{report_id}")
        async def wrong(id: int) -> None: ...
    assert "wrong" not in other.tasks


# ---- delayed tasks ------------------------------------------------------------------------

def test_schedule_with_delay_starts_scheduled_then_succeeds(start):
    start(app)
    h = add.schedule(20, 1, delay=0.5)
    assert isinstance(h, cpsl.TaskHandle)
    assert h.status() is cpsl.TaskState.SCHEDULED
    assert h.result(timeout=30) == 21
    info = h.info()
    assert info.state is cpsl.TaskState.SUCCEEDED
    # it did not start early (lower bound only, generous)
    assert info.started_at - info.created_at >= 0.25


def test_schedule_needs_exactly_one_of_delay_and_at():
    import datetime as dt

    with pytest.raises(cpsl.ConfigError):
        add.schedule(1, 2)
    with pytest.raises(cpsl.ConfigError):
        add.schedule(1, 2, delay=1.0, at=dt.datetime.now(dt.UTC))


def test_wait_all_pipelines_the_waits_and_keeps_order(start, tmp_path):
    start(app, workers=2)
    handles = square.map(list(range(300)))
    assert cpsl.wait_all(handles, timeout=60) == [n * n for n in range(300)]
    # a task still running makes wait_all time out, naming how many are left
    gate = tmp_path / "gate"
    slow = gated.submit(str(gate), 1)
    with pytest.raises(TimeoutError, match="1 tasks"):
        cpsl.wait_all([add.submit(1, 1), slow], timeout=0.5)
    gate.touch()
    assert cpsl.wait_all([slow], timeout=30) == [1]

    async def together() -> list[int]:
        return await cpsl.await_all(square.map([2, 3]))

    assert asyncio.run(together()) == [4, 9]
