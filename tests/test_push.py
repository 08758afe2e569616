"""Outcomes pushed to the submitting client: a submit asks for its tasks' outcomes up front, so
``result()`` costs no round trip of its own, and nothing is left waiting when it is not used."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.connection import Connection

app = cpsl.App("push", grace=5.0)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task(retries=2)
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task(retries=2)
async def gate(path: str) -> str:
    """Runs until the test creates ``path`` (bounded: a test that forgets fails, not hangs)."""
    for _ in range(3000):
        if os.path.exists(path):
            return path
        await asyncio.sleep(0.01)
    raise TimeoutError(path)


@app.task(lock="only:{key}", on_conflict="reject")
async def exclusive(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return key


@app.task(lock="shared:{key}")
async def joined(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return key


def _count_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the Wait requests this process sends (a spy: every call goes through)."""
    sent: list[int] = []
    real = Connection.request

    def request(self: Connection, make, frames=None, record=None):  # type: ignore[no-untyped-def]
        if isinstance(make(0), messages.Wait):
            sent.append(1)
        return real(self, make, frames, record)

    monkeypatch.setattr(Connection, "request", request)
    return sent


def test_results_arrive_without_a_wait_round_trip(start, monkeypatch):
    start(app)
    waits = _count_waits(monkeypatch)
    handles = [*add.map([(i, 1) for i in range(500)]), add.submit(1000, 1)]
    assert [h.result(timeout=30) for h in handles] == [i + 1 for i in range(500)] + [1001]
    assert cpsl.wait_all(add.map([(i, 2) for i in range(100)]), timeout=30) == [i + 2 for i in range(100)]

    async def gathered() -> list[int]:
        hs = await asyncio.gather(*(add.asubmit(i, 3) for i in range(50)))
        return list(await asyncio.gather(*hs))

    assert asyncio.run(asyncio.wait_for(gathered(), 60)) == [i + 3 for i in range(50)]
    assert waits == []
    conn = app.client()
    wait_until(lambda: not conn.outstanding(), 10)  # every pushed reply was taken


def test_a_timeout_keeps_the_push_and_a_handle_from_elsewhere_still_waits(start, monkeypatch):
    start(app)
    h = nap.submit(0.5)
    with pytest.raises(TimeoutError):
        h.result(timeout=0.05)
    assert h.result(timeout=30) == 0.5  # the same pushed outcome, not a new request
    other = cpsl.TaskHandle.from_id(app, h.id)  # another process's view: no push, a Wait
    waits = _count_waits(monkeypatch)
    assert other.result(timeout=30) == 0.5 and waits == [1]


def test_joined_and_rejected_submits_leave_nothing_expected(start):
    start(app)
    first = exclusive.submit("k", 0.3)
    with pytest.raises(cpsl.LockConflict):
        exclusive.submit("k", 0.0)
    holder = joined.submit("j", 0.3)
    dup = joined.submit("j", 0.0)
    assert dup.deduplicated and dup.id == holder.id
    assert first.result(timeout=30) == "k" and dup.result(timeout=30) == "j" and holder.result(timeout=30) == "j"
    conn = app.client()
    wait_until(lambda: not conn.outstanding(), 10)


def test_dropped_handles_leave_nothing_behind(start):
    rt = start(app)
    for i in range(300):
        add.submit(i, 0)  # fire and forget
    conn = app.client()
    wait_until(lambda: rt.status()["tasks"].get("SUCCEEDED", 0) >= 300, 30)
    wait_until(lambda: not conn.outstanding(), 10)


def test_pushed_outcomes_survive_a_supervisor_restart(start, state_dir: Path):
    rt = start(app)
    handles = [nap.submit(1.0) for _ in range(5)]
    wait_until(lambda: rt.status()["tasks"].get("RUNNING", 0) == 5, 20)
    os.kill(rt.pid, signal.SIGKILL)
    rt.process.wait(10)
    conn = app.client()
    wait_until(lambda: not conn.connected, 10)  # this client saw the supervisor go
    start(app)
    # the pushes died with the supervisor; the client asks again on reconnect (a re-run)
    assert [h.result(timeout=60) for h in handles] == [1.0] * 5
    assert all(h.info().attempts == 2 for h in handles)


def test_a_forked_child_waits_through_its_own_connection(start):
    start(app)
    h = nap.submit(0.3)
    pid = os.fork()
    if pid == 0:  # the parent's push future (and its I/O thread) do not exist here
        code = 3
        try:
            code = 0 if h.result(timeout=20) == 0.3 else 1
        finally:
            os._exit(code)
    statuses: list[int] = []

    def the_forked_child_exited() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(status)
        return bool(done)

    try:
        wait_until(the_forked_child_exited, 40, interval=0.05)
    finally:
        if not statuses:  # it did not get the result: leave no process behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(statuses[0]) == 0
    assert h.result(timeout=20) == 0.3


def test_requests_from_many_threads_each_get_their_answer(start):
    """Callers in several threads share one connection; a burst wakes its I/O thread once, and
    no request may be left unsent (a lost wake-up used to hang them all)."""
    start(app)
    conn = app.client()
    failures: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(150):
                conn.call(lambda req: messages.Status(req), timeout=10)
                if i % 10 == 0:
                    assert add.submit(k, i).result(timeout=10) == k + i
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "requests hung"
    assert not failures, failures[0]


def _leader(conn: Connection) -> int | None:
    """The thread that waits on the socket itself (``Connection._lead``), if a caller does."""
    owner = conn._owner
    return owner if owner not in (None, -1) else None


def test_a_caller_waiting_on_the_socket_serves_every_other_caller(start, tmp_path):
    """One thread waits for a long task on the socket itself; the other threads' and an event
    loop's requests go out and their answers come meanwhile (it does the I/O thread's turns)."""
    start(app)
    conn = app.client()._conn
    done = tmp_path / "done"
    waited: list[object] = []
    waiter = threading.Thread(target=lambda: waited.append(gate.submit(str(done)).result(timeout=40)))
    waiter.start()
    try:
        wait_until(lambda: _leader(conn) == waiter.ident, 20)
        assert [add.submit(i, 1).result(timeout=10) for i in range(20)] == [i + 1 for i in range(20)]
        assert cpsl.wait_all(add.map([(i, 2) for i in range(50)]), timeout=10) == [i + 2 for i in range(50)]

        async def gathered() -> list[int]:
            hs = await asyncio.gather(*(add.asubmit(i, 3) for i in range(20)))
            return list(await asyncio.gather(*hs))

        assert asyncio.run(asyncio.wait_for(gathered(), 20)) == [i + 3 for i in range(20)]
        others: list[int] = []
        threads = [threading.Thread(target=lambda k=k: others.append(add.submit(k, 0).result(timeout=10)))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(others) == [0, 1, 2, 3]
        assert _leader(conn) == waiter.ident  # all of that while the first caller kept the socket
    finally:
        done.touch()
        waiter.join(40)
    assert waited == [str(done)]
    wait_until(lambda: _leader(conn) is None and not conn.outstanding(), 10)
    assert add.submit(5, 5).result(timeout=10) == 10  # the I/O thread took the socket back


def test_a_caller_waiting_on_the_socket_hands_it_back_for_a_restart(start, tmp_path):
    """A supervisor that dies while a caller waits on the socket: the caller gives the socket
    back to the I/O thread, which reconnects and resends; the wait ends with the re-run's result."""
    rt = start(app)
    conn = app.client()._conn
    done = tmp_path / "done"
    waited: list[object] = []
    h = gate.submit(str(done))
    waiter = threading.Thread(target=lambda: waited.append(h.result(timeout=60)))
    waiter.start()
    try:
        wait_until(lambda: _leader(conn) == waiter.ident and rt.status()["tasks"].get("RUNNING", 0) == 1, 20)
        os.kill(rt.pid, signal.SIGKILL)
        rt.process.wait(10)
        wait_until(lambda: not conn.connected and _leader(conn) is None, 10)
        start(app)
        wait_until(lambda: conn.connected, 20)
    finally:
        done.touch()
        waiter.join(60)
    assert waited == [str(done)]
    assert h.info().attempts == 2
