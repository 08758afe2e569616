"""Sessions and runtime context (SPEC section 2), across real processes: reply, notify, stream and
progress from async, plain-def and process=True tasks; ordered delivery to ``h.events()`` and
``app.subscribe()`` (live, late, resumed with a cursor, under load); ``current_session()`` in
concurrent tasks; ``session.db`` (shared, isolated, atomic increments); bad input."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors import messages

STORES = ("sqlite", "postgresql")  # every test that starts a runtime runs on both stores

app = cpsl.App("sessions")

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
WORDS = ("one", "two", "three")


# ---- tasks (module level, so the registry travels to the supervisor) -----------------------

@app.task
async def talk_async(tag: str, session: cpsl.Session | None = None) -> str | None:
    """Every kind of session event from an async task (awaited and not awaited)."""
    await session.reply(f"hello from {tag}")
    session.report_progress(0.25, "started")
    async with session.stream() as s:
        for word in WORDS:
            await s.write(word)
    session.notify(f"{tag} done", level="success")  # not awaited: sent all the same
    session.report_progress(1.0)
    current = cpsl.current_session()
    return current.id if current else None


@app.task
def talk_plain(tag: str, session: cpsl.Session | None = None) -> str | None:
    """The same from a plain def (thread pool): no awaits at all."""
    session.reply(f"hello from {tag}")
    session.report_progress(0.25, "started")
    with session.stream() as s:
        for word in WORDS:
            s.write(word)
    session.notify(f"{tag} done", level="success")
    session.report_progress(1.0)
    current = cpsl.current_session()
    return current.id if current else None


@app.task(process=True)
def talk_process(tag: str, session: cpsl.Session | None = None) -> str | None:
    """The same from a process-isolated actor."""
    session.reply(f"hello from {tag}")
    session.report_progress(0.25, "started")
    with session.stream() as s:
        for word in WORDS:
            s.write(word)
    session.notify(f"{tag} done", level="success")
    session.report_progress(1.0)
    current = cpsl.current_session()
    return current.id if current else None


TALKERS = {"async": talk_async, "plain": talk_plain, "process": talk_process}


@app.task
async def whoami(gate: str, session: cpsl.Session | None = None) -> tuple[str, str, str, int]:
    """current_session() before and after awaits, while many others run on the same loop."""
    before = cpsl.current_session().id
    await _wait_for_file(gate)
    await asyncio.sleep(0)
    after = cpsl.current_session().id
    return before, after, session.id, os.getpid()


@app.task
def whoami_plain(gate: str, session: cpsl.Session | None = None) -> tuple[str, str, str, int]:
    before = cpsl.current_session().id
    _wait_for_file_sync(gate)
    after = cpsl.current_session().id
    return before, after, session.id, os.getpid()


@app.task
async def replies(n: int, prefix: str = "r", session: cpsl.Session | None = None) -> int:
    for i in range(n):
        await session.reply(f"{prefix}{i}")
    return n


@app.task
async def gated_reply(gate: str, text: str, session: cpsl.Session | None = None) -> str:
    await _wait_for_file(gate)
    await session.reply(text)
    return text


@app.task
async def db_write(key: str, value: Any, session: cpsl.Session | None = None) -> dict[str, Any]:
    session.db[key] = value
    return dict(session.db.items())


@app.task
def db_read(key: str, session: cpsl.Session | None = None) -> Any:
    return session.db.get(key, "<missing>")


@app.task(process=True)
def db_read_process(key: str, session: cpsl.Session | None = None) -> Any:
    return session.db.get(key, "<missing>")


@app.task
async def db_dict_api(session: cpsl.Session | None = None) -> dict[str, Any]:
    """The dict-like surface of session.db inside a task."""
    db = session.db
    db["a"] = 1
    db["b"] = {"nested": [1, 2, 3], "s": "x"}
    db["c"] = "gone soon"
    del db["c"]
    try:
        del db["c"]
        missing_del = "no error"
    except KeyError:
        missing_del = "KeyError"
    try:
        db["nope"]
        missing_get = "no error"
    except KeyError:
        missing_get = "KeyError"
    return {
        "keys": list(db),
        "len": len(db),
        "items": db.items(),
        "get_default": db.get("zzz", 42),
        "contains": ["a" in db, "c" in db],
        "update": db.update("lst", lambda old: [*old, "x"], default=[]),
        "update2": db.update("lst", lambda old: [*old, "y"], default=[]),
        "inc": [db.increment("n"), db.increment("n", by=5), db.increment("f", by=0.5)],
        "missing_del": missing_del,
        "missing_get": missing_get,
    }


async def _bump(gate: str, n: int, session: cpsl.Session) -> list[int]:
    await _wait_for_file(gate)
    return [session.db.increment("count") for _ in range(n)]


@app.task
async def bump_async(gate: str, n: int, session: cpsl.Session | None = None) -> list[int]:
    return await _bump(gate, n, session)


@app.task
def bump_plain(gate: str, n: int, session: cpsl.Session | None = None) -> list[int]:
    _wait_for_file_sync(gate)
    return [session.db.increment("count") for _ in range(n)]


@app.task(process=True)
def bump_process(gate: str, n: int, session: cpsl.Session | None = None) -> list[int]:
    _wait_for_file_sync(gate)
    return [session.db.increment("count") for _ in range(n)]


@app.task
async def db_bad_value(session: cpsl.Session | None = None) -> None:
    session.db["ok"] = "kept"
    session.db["bad"] = {1, 2, 3}  # a set is not JSON: SerializationError, the task fails


@app.task
def db_bad_update(session: cpsl.Session | None = None) -> dict[str, Any]:
    """A failing update rolls back and leaves the value as it was."""
    session.db["v"] = 1
    errors = []
    try:
        session.db.update("v", lambda old: object())
    except cpsl.SerializationError:
        errors.append("SerializationError")
    try:
        session.db.update("v", lambda old: 1 / 0)
    except ZeroDivisionError:
        errors.append("ZeroDivisionError")
    session.db.increment("v")  # the store still works after the rollbacks
    return {"errors": errors, "v": session.db["v"]}


@app.task
async def bad_notify_level(session: cpsl.Session | None = None) -> None:
    await session.notify("too loud", level="loud")


@app.task
async def notify_levels(levels: list[str], session: cpsl.Session | None = None) -> int:
    await session.notify("default")
    for level in levels:
        await session.notify(f"at {level}", level=level)
    return len(levels)


@app.task
def bad_progress_values(values: list[Any], session: cpsl.Session | None = None) -> list[str]:
    out = []
    for value in values:
        try:
            session.report_progress(value)
            out.append("accepted")
        except cpsl.ConfigError:
            out.append("ConfigError")
    return out


@app.task
async def bad_progress(value: Any, session: cpsl.Session | None = None) -> None:
    session.report_progress(value)


@app.task
async def bad_reply_text(session: cpsl.Session | None = None) -> None:
    await session.reply(12345)  # type: ignore[arg-type]


@app.task
async def unbound_async(session: cpsl.Session | None = None) -> tuple[bool, bool]:
    await asyncio.sleep(0)
    return session is None, cpsl.current_session() is None


@app.task
def unbound_plain() -> bool:
    return cpsl.current_session() is None


@app.task(process=True)
def unbound_process(session: cpsl.Session | None = None) -> tuple[bool, bool]:
    return session is None, cpsl.current_session() is None


@app.task
async def return_session(session: cpsl.Session | None = None) -> cpsl.Session | None:
    return session


_LEAKED: list[cpsl.Session] = []  # per actor process


@app.task
async def leak_session(session: cpsl.Session | None = None) -> int:
    _LEAKED.append(session)
    return os.getpid()


@app.task
async def use_leaked_session() -> tuple[int, str]:
    """Reply on a session whose task has ended (kept in a global of the same actor)."""
    if not _LEAKED:
        return os.getpid(), "no leaked session in this actor"
    try:
        await _LEAKED[-1].reply("from beyond the grave")
    except cpsl.ConfigError:
        return os.getpid(), "ConfigError"
    return os.getpid(), "no error"


@app.task
async def needs_session(text: str, session: cpsl.Session) -> str:
    return f"{session.id}: {text}"


@app.task
async def show_from_task(task_id: str, session: cpsl.Session | None = None) -> str:
    session.show_task(cpsl.TaskHandle.from_id(app, task_id))
    return task_id


@app.task
async def gated(gate: str) -> str:
    await _wait_for_file(gate)
    return "opened"


async def _wait_for_file(path: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {path} never opened")
        await asyncio.sleep(0.01)


def _wait_for_file_sync(path: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {path} never opened")
        time.sleep(0.01)


# ---- helpers (every wait is bounded) ---------------------------------------------------------

def bounded(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run a blocking fn in a daemon thread; fail the test (not hang) past ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{fn} did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_async(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ended(task_ids: set[str]) -> Callable[[list[cpsl.TaskEvent]], bool]:
    """A stop condition: every task in ``task_ids`` has a terminal state event."""
    def stop(events: list[cpsl.TaskEvent]) -> bool:
        done = {e.task_id for e in events if e.kind == "state" and e.data.get("state") in TERMINAL}
        return task_ids <= done
    return stop


async def take_async(sub: Any, stop: Callable[[list[cpsl.TaskEvent]], bool]) -> list[cpsl.TaskEvent]:
    events: list[cpsl.TaskEvent] = []
    async for event in sub:
        events.append(event)
        if stop(events):
            break
    return events


def take_sync(sub: Any, stop: Callable[[list[cpsl.TaskEvent]], bool], timeout: float = 60.0) -> list[cpsl.TaskEvent]:
    def run() -> list[cpsl.TaskEvent]:
        events: list[cpsl.TaskEvent] = []
        for event in sub:
            events.append(event)
            if stop(events):
                break
        return events
    return bounded(run, timeout)


def task_events_sync(h: cpsl.TaskHandle, timeout: float = 60.0) -> list[cpsl.TaskEvent]:
    return bounded(lambda: list(h.events()), timeout)


async def task_events_async(h: cpsl.TaskHandle) -> list[cpsl.TaskEvent]:
    return [e async for e in h.events()]


def states(events: list[cpsl.TaskEvent]) -> list[str]:
    return [e.data["state"] for e in events if e.kind == "state"]


def talk(events: list[cpsl.TaskEvent]) -> list[tuple[str, dict[str, Any]]]:
    """The non-state events as (kind, data), with the stream id left out (checked apart)."""
    out = []
    for e in events:
        if e.kind == "state":
            continue
        data = {k: v for k, v in e.data.items() if k != "stream"}
        out.append((e.kind, data))
    return out


def expected_talk(tag: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("reply", {"text": f"hello from {tag}"}),
        ("progress", {"fraction": 0.25, "message": "started"}),
        *[("stream", {"chunk": w, "final": False}) for w in WORDS],
        ("stream", {"chunk": "", "final": True}),
        ("notify", {"text": f"{tag} done", "level": "success"}),
        ("progress", {"fraction": 1.0, "message": None}),
    ]


def assert_ordered(events: list[cpsl.TaskEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs), seqs
    assert len(set(seqs)) == len(seqs), "duplicate events"


# ---- reply / notify / stream / progress, in order, everywhere -------------------------------

@pytest.mark.parametrize("variant", ["async", "plain", "process"])
def test_all_event_kinds_arrive_in_order_in_events_and_subscribe(start, variant):
    start(app, workers=2, process_workers=1)
    task = TALKERS[variant]
    sid = f"talk-{variant}"
    chat = cpsl.Session(sid)

    async def live() -> tuple[cpsl.TaskHandle, list[cpsl.TaskEvent], list[cpsl.TaskEvent]]:
        sub = app.subscribe(sid)  # subscribed before the task exists: events arrive live
        h = await task.asubmit(variant, session=chat)
        from_sub, from_handle = await asyncio.gather(take_async(sub, ended({h.id})), task_events_async(h))
        return h, from_sub, from_handle

    h, from_sub, from_handle_async = run_async(live())
    assert h.result(timeout=30) == sid

    from_handle = task_events_sync(h)
    late_sync = take_sync(app.subscribe(sid), ended({h.id}))

    for events in (from_sub, from_handle_async, from_handle, late_sync):
        assert_ordered(events)
        assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
        assert [e.kind for e in events] == (
            ["state", "state", "reply", "progress", "stream", "stream", "stream", "stream", "notify",
             "progress", "state"])
        assert talk(events) == expected_talk(variant)
        assert all(e.task_id == h.id and e.session_id == sid for e in events)
        assert all(isinstance(e.ts, float) and abs(e.ts - time.time()) < 300 for e in events)
        stream_ids = {e.data["stream"] for e in events if e.kind == "stream"}
        assert len(stream_ids) == 1 and all(isinstance(s, str) and s for s in stream_ids)

    # the four views are the same events
    assert [e.seq for e in from_sub] == [e.seq for e in from_handle] == [e.seq for e in from_handle_async] \
        == [e.seq for e in late_sync]
    assert from_sub == from_handle == late_sync
    info = h.info()
    assert info.progress == 1.0
    assert info.session_id == sid


def test_progress_is_visible_in_task_info_while_running(start, tmp_path):
    start(app, workers=2, process_workers=1)
    gate = tmp_path / "gate"

    h = gated_reply.submit(str(gate), "late", session=cpsl.Session("prog-0"))
    assert h.info().progress is None
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING, timeout=30)
    assert h.info().progress is None
    gate.touch()
    assert h.result(timeout=30) == "late"
    assert h.info().progress is None  # never reported

    h = talk_async.submit("p", session=cpsl.Session("prog-1"))
    assert h.result(timeout=30) == "prog-1"
    assert h.info().progress == 1.0


def test_events_of_different_sessions_do_not_mix(start):
    start(app, workers=2, process_workers=1)
    ha = talk_async.submit("A", session=cpsl.Session("mix-a"))
    hb = talk_plain.submit("B", session=cpsl.Session("mix-b"))
    assert ha.result(timeout=30) == "mix-a" and hb.result(timeout=30) == "mix-b"
    a = take_sync(app.subscribe("mix-a"), ended({ha.id}))
    b = take_sync(app.subscribe("mix-b"), ended({hb.id}))
    assert {e.task_id for e in a} == {ha.id} and {e.session_id for e in a} == {"mix-a"}
    assert {e.task_id for e in b} == {hb.id} and {e.session_id for e in b} == {"mix-b"}
    assert talk(a) == expected_talk("A") and talk(b) == expected_talk("B")


# ---- current_session() in concurrent tasks --------------------------------------------------

def test_current_session_is_per_task_among_concurrent_async_tasks_on_one_actor(start, tmp_path):
    start(app, workers=1, process_workers=1)
    gate = tmp_path / "gate"
    handles = [whoami.submit(str(gate), session=cpsl.Session(f"conc-{i}")) for i in range(20)]
    # all 20 are running at once on the single worker actor before any of them goes on
    wait_until(lambda: all(h.status() is cpsl.TaskState.RUNNING for h in handles), timeout=30)
    gate.touch()
    results = [h.result(timeout=30) for h in handles]
    for i, (before, after, param, _pid) in enumerate(results):
        assert before == after == param == f"conc-{i}"
    assert len({pid for *_, pid in results}) == 1  # one actor ran them all


def test_current_session_is_per_task_among_concurrent_plain_tasks(start, tmp_path):
    start(app, workers=1, process_workers=1)
    gate = tmp_path / "gate"
    handles = [whoami_plain.submit(str(gate), session=cpsl.Session(f"thr-{i}")) for i in range(8)]
    wait_until(lambda: all(h.status() is cpsl.TaskState.RUNNING for h in handles), timeout=30)
    gate.touch()
    results = [h.result(timeout=30) for h in handles]
    for i, (before, after, param, _pid) in enumerate(results):
        assert before == after == param == f"thr-{i}"


# ---- subscribe: late, resumed, under load, non-blocking -------------------------------------

def test_late_subscriber_gets_the_history_from_after_zero(start):
    start(app, workers=2, process_workers=1)
    sid = "late-1"
    h1 = replies.submit(5, "a", session=cpsl.Session(sid))
    h2 = talk_plain.submit("late", session=cpsl.Session(sid))
    assert h1.result(timeout=30) == 5 and h2.result(timeout=30) == sid
    # nobody was listening while they ran; a subscriber that connects now gets all of it
    sync_events = take_sync(app.subscribe(sid, after=0), ended({h1.id, h2.id}))
    async_events = run_async(take_async(app.subscribe(sid), ended({h1.id, h2.id})))
    assert sync_events == async_events
    assert_ordered(sync_events)
    per_task = sorted(task_events_sync(h1) + task_events_sync(h2), key=lambda e: e.seq)
    assert sync_events == per_task
    assert [e.data["text"] for e in sync_events if e.task_id == h1.id and e.kind == "reply"] == [
        f"a{i}" for i in range(5)]
    assert talk([e for e in sync_events if e.task_id == h2.id]) == expected_talk("late")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_subscription_cursor_is_the_last_seq_seen(start, mode):
    start(app, workers=2, process_workers=1)
    h = replies.submit(3, session=cpsl.Session("cursor-1"))
    h.result(timeout=30)
    sub = app.subscribe("cursor-1")
    assert sub.cursor == 0
    def one(events: list[cpsl.TaskEvent]) -> bool:
        return len(events) == 1

    seen = take_sync(sub, one) if mode == "sync" else run_async(take_async(sub, one))
    assert sub.cursor == seen[-1].seq, "cursor must be the seq of the last event handed out"
    sub = app.subscribe("cursor-1", after=7)
    assert sub.cursor == 7


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_subscriber_breaks_out_and_resumes_with_cursor_without_gaps_or_duplicates(start, mode):
    start(app, workers=2, process_workers=1)
    sid = f"resume-{mode}"
    h = replies.submit(10, session=cpsl.Session(sid))
    assert h.result(timeout=30) == 10
    full = task_events_sync(h)
    assert len(full) == 13  # QUEUED RUNNING r0..r9 SUCCEEDED

    def take(sub: Any, stop: Callable[[list[cpsl.TaskEvent]], bool]) -> list[cpsl.TaskEvent]:
        return take_sync(sub, stop) if mode == "sync" else run_async(take_async(sub, stop))

    sub = app.subscribe(sid)
    first = take(sub, lambda ev: len(ev) == 4)  # break out after 4 events
    assert first == full[:4]
    resumed = app.subscribe(sid, after=sub.cursor)
    # a second task marks the end (so a gap shows up as missing events, not as a hang)
    h2 = replies.submit(2, "n", session=cpsl.Session(sid))
    rest = take(resumed, ended({h2.id}))
    rest_of_h = [e for e in rest if e.task_id == h.id]
    assert [e.seq for e in first + rest_of_h] == [e.seq for e in full], "gap or duplicate after resuming"
    assert first + rest_of_h == full
    assert [e for e in rest if e.task_id == h2.id] == task_events_sync(h2)
    assert_ordered(first + rest)

    # resuming once more gets only what happens from then on: a new task's events
    again = app.subscribe(sid, after=resumed.cursor)
    h3 = replies.submit(2, "m", session=cpsl.Session(sid))
    new = take(again, ended({h3.id}))
    assert {e.task_id for e in new} == {h3.id}
    assert new == task_events_sync(h3)


def test_async_subscriber_resumes_with_cursor_while_the_task_runs(start, tmp_path):
    start(app, workers=2, process_workers=1)
    sid = "resume-async"
    gate = tmp_path / "gate"

    async def main() -> tuple[list[cpsl.TaskEvent], list[cpsl.TaskEvent], cpsl.TaskHandle, cpsl.TaskHandle]:
        sub = app.subscribe(sid)
        h1 = await replies.asubmit(6, "x", session=cpsl.Session(sid))
        h2 = await gated_reply.asubmit(str(gate), "after the break", session=cpsl.Session(sid))
        # break out once h1 is over, while h2 still waits for its gate
        first = await take_async(sub, ended({h1.id}))
        gate.touch()
        resumed = app.subscribe(sid, after=sub.cursor)
        rest = await take_async(resumed, ended({h2.id}))
        return first, rest, h1, h2

    first, rest, h1, h2 = run_async(main())
    everything = first + rest
    assert_ordered(everything)
    expected = sorted(task_events_sync(h1) + task_events_sync(h2), key=lambda e: e.seq)
    assert [e.seq for e in everything] == [e.seq for e in expected], "gap or duplicate after resuming"
    assert everything == expected
    assert [e.data["text"] for e in everything if e.kind == "reply"] == [
        *[f"x{i}" for i in range(6)], "after the break"]


def test_a_thousand_events_from_ten_concurrent_tasks_arrive_complete_and_in_order(start):
    start(app, workers=2, process_workers=1)
    sid = "burst"

    async def main() -> tuple[list[cpsl.TaskHandle], list[cpsl.TaskEvent]]:
        sub = app.subscribe(sid)
        handles = await asyncio.gather(*[
            replies.asubmit(100, f"t{t}-", session=cpsl.Session(sid)) for t in range(10)])
        events = await take_async(sub, ended({h.id for h in handles}))
        return list(handles), events

    handles, events = run_async(main(), timeout=120)
    assert [h.result(timeout=30) for h in handles] == [100] * 10
    assert_ordered(events)
    reply_events = [e for e in events if e.kind == "reply"]
    assert len(reply_events) == 1000
    for t, h in enumerate(handles):
        texts = [e.data["text"] for e in reply_events if e.task_id == h.id]
        assert texts == [f"t{t}-{i}" for i in range(100)], f"task {t}: lost or reordered events"
        assert states([e for e in events if e.task_id == h.id]) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert len(events) == 1000 + 30
    # the same through each task's own stream
    for t, h in enumerate(handles):
        own = task_events_sync(h)
        assert [e.data["text"] for e in own if e.kind == "reply"] == [f"t{t}-{i}" for i in range(100)]
        assert own == [e for e in events if e.task_id == h.id]


def test_async_subscribe_does_not_block_the_event_loop(start, tmp_path):
    start(app, workers=2, process_workers=1)
    sid = "ticker"
    gate = tmp_path / "gate"

    async def main() -> tuple[int, list[cpsl.TaskEvent], cpsl.TaskHandle]:
        ticks = 0
        ticked = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1
                if ticks >= 25:
                    ticked.set()

        h = await gated_reply.asubmit(str(gate), "worth the wait", session=cpsl.Session(sid))
        sub = app.subscribe(sid)
        # wait past QUEUED and RUNNING: the subscriber then long-polls with nothing to get
        waiting = asyncio.create_task(take_async(sub, lambda ev: any(e.kind == "reply" for e in ev)))
        tick_task = asyncio.create_task(ticker())
        await ticked.wait()  # the loop keeps ticking while the subscriber waits
        assert not waiting.done()
        before = ticks
        gate.touch()
        events = await waiting
        tick_task.cancel()
        return before, events, h

    ticks, events, h = run_async(main())
    assert ticks >= 25
    assert [e.data["text"] for e in events if e.kind == "reply"] == ["worth the wait"]
    assert h.result(timeout=30) == "worth the wait"


# ---- session.db ---------------------------------------------------------------------------------

def test_db_written_in_a_task_is_read_by_app_code_and_other_tasks_of_the_session(start):
    start(app, workers=2, process_workers=1)
    one, two = cpsl.Session("db-1"), cpsl.Session("db-2")
    value = {"name": "ada", "langs": ["py", "c"], "n": 3, "ok": True, "none": None, "f": 1.5}
    assert db_write.submit("profile", value, session=one).result(timeout=30) == {"profile": value}

    # app code
    db = app.session("db-1").db
    assert db["profile"] == value
    assert db.get("profile") == value
    assert list(db) == ["profile"] and len(db) == 1 and "profile" in db
    assert db.items() == [("profile", value)]

    # another task of the same session, in a worker and in a process actor
    assert db_read.submit("profile", session=one).result(timeout=30) == value
    assert db_read_process.submit("profile", session=one).result(timeout=30) == value

    # other sessions see nothing of it
    assert db_read.submit("profile", session=two).result(timeout=30) == "<missing>"
    assert app.session("db-2").db.get("profile") is None
    assert len(app.session("db-2").db) == 0

    # app code writes, tasks read; delete from app code
    app.session("db-2").db["greeting"] = "hi"
    assert db_read.submit("greeting", session=two).result(timeout=30) == "hi"
    assert db_read_process.submit("greeting", session=two).result(timeout=30) == "hi"
    assert db_read.submit("greeting", session=one).result(timeout=30) == "<missing>"
    del app.session("db-2").db["greeting"]
    assert db_read.submit("greeting", session=two).result(timeout=30) == "<missing>"
    with pytest.raises(KeyError):
        del app.session("db-2").db["greeting"]
    with pytest.raises(KeyError):
        app.session("db-2").db["greeting"]


def test_db_dict_api_inside_a_task(start):
    start(app, workers=2, process_workers=1)
    out = db_dict_api.submit(session=cpsl.Session("dict-api")).result(timeout=30)
    assert out["keys"] == ["a", "b"]
    assert out["len"] == 2
    assert out["items"] == [("a", 1), ("b", {"nested": [1, 2, 3], "s": "x"})]
    assert out["get_default"] == 42
    assert out["contains"] == [True, False]
    assert out["update"] == ["x"] and out["update2"] == ["x", "y"]
    assert out["inc"] == [1, 6, 0.5]
    assert out["missing_del"] == "KeyError" and out["missing_get"] == "KeyError"
    db = app.session("dict-api").db
    assert sorted(db) == ["a", "b", "f", "lst", "n"]
    assert db["lst"] == ["x", "y"] and db["n"] == 6 and db["f"] == 0.5
    assert db.increment("n", by=-6) == 0


def test_concurrent_increments_across_worker_and_process_actors_lose_nothing(start, tmp_path):
    start(app, workers=2, process_workers=1)
    chat = cpsl.Session("counter")
    gate = tmp_path / "gate"
    n = 50
    workers = [bump_async.submit(str(gate), n, session=chat) for _ in range(2)]
    workers += [bump_plain.submit(str(gate), n, session=chat) for _ in range(2)]
    processes = [bump_process.submit(str(gate), n, session=chat) for _ in range(2)]
    # every worker task runs at once (spread over both worker actors), and one process task
    wait_until(lambda: all(h.status() is cpsl.TaskState.RUNNING for h in workers)
               and any(h.status() is cpsl.TaskState.RUNNING for h in processes), timeout=30)
    gate.touch()
    handles = workers + processes
    values = [v for h in handles for v in h.result(timeout=90)]
    total = n * len(handles)
    assert app.session("counter").db["count"] == total
    # each increment saw a distinct value: no two read the same old value
    assert sorted(values) == list(range(1, total + 1))
    worker_slots = {h.info().slot for h in workers}
    process_slots = {h.info().slot for h in processes}
    assert len(worker_slots) == 2, worker_slots
    assert len(process_slots) == 1 and not process_slots & worker_slots


# ---- bad input -------------------------------------------------------------------------------

def test_non_json_db_value_fails_the_task_with_serialization_error(start):
    start(app, workers=2, process_workers=1)
    h = db_bad_value.submit(session=cpsl.Session("bad-db"))
    with pytest.raises(cpsl.SerializationError):
        h.result(timeout=30)
    assert h.status() is cpsl.TaskState.FAILED
    assert h.info().error[0] == "SerializationError"
    db = app.session("bad-db").db
    assert db["ok"] == "kept" and "bad" not in db  # nothing written for the bad key
    # and in app code
    with pytest.raises(cpsl.SerializationError):
        db["x"] = object()
    with pytest.raises(cpsl.SerializationError):
        db["x"] = {"k": {1}}
    assert "x" not in db


def test_failing_db_update_rolls_back(start):
    start(app, workers=2, process_workers=1)
    out = db_bad_update.submit(session=cpsl.Session("bad-upd")).result(timeout=30)
    assert out == {"errors": ["SerializationError", "ZeroDivisionError"], "v": 2}


def test_bad_notify_level_fails_the_task_with_config_error(start):
    start(app, workers=2, process_workers=1)
    h = bad_notify_level.submit(session=cpsl.Session("bad-level"))
    with pytest.raises(cpsl.ConfigError, match="loud"):
        h.result(timeout=30)
    assert h.status() is cpsl.TaskState.FAILED
    assert h.info().error[0] == "ConfigError"
    events = task_events_sync(h)
    assert [e.kind for e in events] == ["state", "state", "state"]  # no notify was sent
    assert states(events) == ["QUEUED", "RUNNING", "FAILED"]
    assert "ConfigError" in events[-1].data["error"]


def test_every_notify_level_is_accepted(start):
    start(app, workers=2, process_workers=1)
    levels = ["debug", "info", "success", "warning", "error"]
    h = notify_levels.submit(levels, session=cpsl.Session("levels"))
    assert h.result(timeout=30) == len(levels)
    notes = [e.data for e in task_events_sync(h) if e.kind == "notify"]
    assert notes == [{"text": "default", "level": "info"},
                     *[{"text": f"at {lv}", "level": lv} for lv in levels]]


def test_progress_outside_zero_to_one_is_config_error(start):
    start(app, workers=2, process_workers=1)
    values = [-0.1, 1.01, 2, float("nan"), "0.5", None, 0, 0.5, 1]
    out = bad_progress_values.submit(values, session=cpsl.Session("bad-prog")).result(timeout=30)
    assert out == ["ConfigError"] * 6 + ["accepted"] * 3
    h = bad_progress.submit(1.5, session=cpsl.Session("bad-prog"))
    with pytest.raises(cpsl.ConfigError):
        h.result(timeout=30)
    assert h.info().progress is None
    assert h.info().error[0] == "ConfigError"
    assert [e.kind for e in task_events_sync(h)] == ["state", "state", "state"]


def test_reply_with_non_text_fails_the_task_with_config_error(start):
    start(app, workers=2, process_workers=1)
    h = bad_reply_text.submit(session=cpsl.Session("bad-text"))
    with pytest.raises(cpsl.ConfigError):
        h.result(timeout=30)


def test_talking_on_an_unbound_session_in_app_code_is_config_error():
    s = cpsl.Session("x")
    with pytest.raises(cpsl.ConfigError):
        s.reply("hi")
    with pytest.raises(cpsl.ConfigError):
        s.notify("hi", level="info")
    with pytest.raises(cpsl.ConfigError):
        s.report_progress(0.5)
    with pytest.raises(cpsl.ConfigError), s.stream() as stream:
        stream.write("chunk")
    with pytest.raises(cpsl.ConfigError):
        s.db  # noqa: B018 - no runtime behind a bare Session

    async def in_async() -> None:
        with pytest.raises(cpsl.ConfigError):
            await s.reply("hi")
        with pytest.raises(cpsl.ConfigError):
            await s.notify("hi")
        with pytest.raises(cpsl.ConfigError):
            async with s.stream() as stream:
                await stream.write("chunk")

    run_async(in_async(), timeout=10)
    # app.session(...) reaches the store, not a task
    with pytest.raises(cpsl.ConfigError):
        app.session("x").reply("hi")
    with pytest.raises(cpsl.ConfigError):
        cpsl.Session("")


def test_a_session_that_came_back_from_a_task_is_unbound(start):
    start(app, workers=2, process_workers=1)
    s = return_session.submit(session=cpsl.Session("back", owner="ada")).result(timeout=30)
    assert s == cpsl.Session("back", owner="ada")
    with pytest.raises(cpsl.ConfigError):
        s.reply("hi")


def test_reply_on_a_session_whose_task_has_ended_is_config_error(start):
    start(app, workers=1, process_workers=1)
    pid = leak_session.submit(session=cpsl.Session("leak")).result(timeout=30)
    h = use_leaked_session.submit()
    other_pid, outcome = h.result(timeout=30)
    assert other_pid == pid  # one worker actor: the same process kept the session
    assert outcome == "ConfigError", "a session is bound only while its task runs"


def test_unbound_tasks_run_with_no_session(start):
    start(app, workers=2, process_workers=1)
    assert unbound_async.submit().result(timeout=30) == (True, True)
    assert unbound_plain.submit().result(timeout=30) is True
    assert unbound_process.submit().result(timeout=30) == (True, True)
    h = unbound_async.submit()
    assert h.result(timeout=30) == (True, True)
    events = task_events_sync(h)
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert all(e.kind == "state" and e.session_id is None for e in events)
    assert h.info().session_id is None
    assert math.isclose(h.info().created_at, time.time(), abs_tol=300)


def test_session_db_has_one_writer_the_supervisor(start, state_dir):
    """What if app code and tasks write session.db? Every operation goes through the
    supervisor: this process never opens the store, and with no supervisor a write fails with
    NotRunning and changes nothing."""
    rt = start(app)
    db = app.session("one-writer").db
    db["k"] = 1
    assert db_write.submit("t", 2, session=cpsl.Session("one-writer")).result(timeout=30) == {"k": 1, "t": 2}
    assert db.increment("n") == 1 and db.increment("n") == 2
    assert not [f.path for f in psutil.Process().open_files() if "capsule.db" in f.path]
    rt.stop()
    with pytest.raises(cpsl.NotRunning):
        app.session("one-writer").db["k"] = 5
    start(app)
    assert dict(app.session("one-writer").db.items()) == {"k": 1, "n": 2, "t": 2}


def test_a_subscription_with_a_timeout_is_bounded(start):
    """What if nothing comes? With ``timeout=``, an iteration that outlasts it raises
    TimeoutError (sync and async) and its held poll is forgotten; a subscription resumed from
    the cursor still gets what came later."""
    start(app)
    sid = "quiet"
    sub = app.subscribe(sid, timeout=0.5)
    with pytest.raises(TimeoutError, match="quiet"):
        for _ in sub:
            pass
    with pytest.raises(TimeoutError):
        run_async(take_async(app.subscribe(sid, timeout=0.5), lambda events: False))
    assert app.client().outstanding() == 0  # neither poll is still waiting for an answer
    h = replies.submit(2, session=cpsl.Session(sid))
    events = take_sync(app.subscribe(sid, after=sub.cursor, timeout=30), ended({h.id}))
    assert [e.data["text"] for e in events if e.kind == "reply"] == ["r0", "r1"]
    with pytest.raises(cpsl.ConfigError, match="timeout"):
        app.subscribe(sid, timeout=-1)


# ---- task cards shown from app code; a session parameter without a default ----------------

def test_show_task_from_app_code_sends_the_card_and_its_updates_to_that_session(start, tmp_path):
    start(app, workers=2, process_workers=1)
    gate = tmp_path / "gate"
    h = gated.submit(str(gate))  # a task of no session at all
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING, timeout=30)

    # When app code (not a task) shows the task to two sessions, a bare one and app.session()'s
    cpsl.Session("viewer-1").show_task(h)
    app.session("viewer-2").show_task(h)
    gate.touch()
    assert h.result(timeout=30) == "opened"

    # Then each session's subscribers get the card, then its update as the task ends
    for sid in ("viewer-1", "viewer-2"):
        def final(events: list[cpsl.TaskEvent]) -> bool:
            return any(e.kind == "card" and e.data.get("state") == "SUCCEEDED" for e in events)

        cards = take_sync(app.subscribe(sid), final, timeout=30)
        assert all(e.kind == "card" and e.task_id == h.id and e.session_id == sid for e in cards), cards
        assert cards[0].data["state"] == "RUNNING" and cards[0].data["name"] == "gated"
        assert cards[-1].data["card"] == h.id and cards[-1].data.get("update")

    # ... and an unknown task is refused by name, nothing shown
    ghost = cpsl.TaskHandle(app, "0" * 32, "ghost")
    with pytest.raises(cpsl.UnknownTask, match=r"0{32}"):
        cpsl.Session("viewer-3").show_task(ghost)


def test_show_task_inside_a_task_still_goes_with_the_tasks_events(start):
    start(app, workers=2, process_workers=1)
    target = needs_session.submit("x", session=cpsl.Session("other"))
    target.result(timeout=30)
    shower_result = show_from_task.submit(target.id, session=cpsl.Session("in-task")).result(timeout=30)
    assert shower_result == target.id
    cards = take_sync(app.subscribe("in-task"), lambda es: any(e.kind == "card" for e in es), timeout=30)
    card = next(e for e in cards if e.kind == "card")
    assert card.task_id == target.id and card.data["state"] == "SUCCEEDED"


def test_a_session_parameter_without_a_default_needs_session_at_submit(start, state_dir):
    # Without a runtime: the error comes before anything is sent, naming the task and the parameter
    for submit in (lambda: needs_session.submit("hi"), lambda: needs_session.map(["a", "b"]),
                   lambda: needs_session.schedule("hi", delay=5),
                   lambda: asyncio.run(needs_session.asubmit("hi"))):
        with pytest.raises(cpsl.ConfigError, match=r"needs_session.*'session'.*session=cpsl\.Session"):
            submit()
    # With one: the same, nothing recorded; with session= it runs
    start(app, workers=1, process_workers=1)
    with pytest.raises(cpsl.ConfigError, match="'session'"):
        needs_session.submit("hi")
    assert needs_session.submit("hi", session=cpsl.Session("s1")).result(timeout=30) == "s1: hi"
    rows, _ = app.client().call(lambda req: messages.ListTasks(req, None, 10))
    assert [r["name"] for r in rows] == ["needs_session"]
