"""Reliability and hostile input: backpressure, retention, graceful stop under load, fuzzed peers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import skip_or_fail, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.errors import ProtocolError
from capsule_actors.transport import read_runtime_file

app = cpsl.App("reliable")
small = cpsl.App("small", max_queued=5)
short_lived = cpsl.App("short", result_ttl=1.0)


async def _gated(gate: str) -> str:
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return "opened"


gated = small.task(name="gated")(_gated)


@short_lived.task
async def quick(x: int) -> int:
    return x


@app.task
async def nap(i: int) -> int:
    await asyncio.sleep(0.3)
    return i


# The hostile-peer tests share one runtime for the module: give it an App of its own, so other
# tests starting and stopping runtimes of `app` never change where its tasks are sent.
hostile = cpsl.App("hostile")
hostile_nap = hostile.task(name="nap")(nap.fn)


def test_backpressure_when_max_queued_is_reached(start, tmp_path):
    rt = start(small)
    gate = tmp_path / "gate"
    handles = [gated.submit(str(gate)) for _ in range(5)]
    before = sum(rt.status()["tasks"].values())
    assert before == 5
    with pytest.raises(cpsl.Backpressure, match="max_queued=5"):
        gated.submit(str(gate))
    with pytest.raises(cpsl.Backpressure):
        gated.map([(str(gate),), (str(gate),)])
    assert sum(rt.status()["tasks"].values()) == before  # nothing recorded
    gate.touch()
    assert [h.result(timeout=30) for h in handles] == ["opened"] * 5
    assert gated.submit(str(gate)).result(timeout=30) == "opened"  # serving again


def test_finished_tasks_are_pruned_after_result_ttl(start):
    start(short_lived)
    h = quick.submit(3)
    assert h.result(timeout=30) == 3
    def gone() -> bool:
        try:
            cpsl.TaskHandle.from_id(short_lived, h.id)
        except cpsl.UnknownTask:
            return True
        return False
    wait_until(gone, timeout=15)


def test_sigterm_with_a_thousand_tasks_in_flight_loses_nothing(state_dir):
    from capsule_actors import testing

    with testing.start_runtime(app, state_dir, workers=2, grace=2.0) as rt:
        handles = nap.map(list(range(1000)))
        wait_until(lambda: rt.status()["tasks"].get("RUNNING", 0) > 50)
        code = rt.stop()
        assert code == 0
    # every acknowledged task is either done or waiting for the next start
    with testing.start_runtime(app, state_dir, workers=2) as rt:
        results = [h.result(timeout=60) for h in handles]
        assert results == list(range(1000))
        assert rt.status()["tasks"] == {"SUCCEEDED": 1000}


before_deploy = cpsl.App("deploy")
after_deploy = cpsl.App("deploy")  # the same app, a release later: ``retired`` was removed


@before_deploy.task
async def retired(x: int) -> int:
    return x


@after_deploy.task
async def kept(x: int) -> int:
    return x


def test_a_waiting_task_the_app_no_longer_has_fails_at_the_next_start(state_dir):
    from capsule_actors import testing

    # Given a task waiting in the store (delayed) when the runtime stops
    with testing.start_runtime(before_deploy, state_dir, workers=1) as rt:
        waiting = retired.schedule(1, delay=3600)
        assert rt.stop() == 0
    # When the next release, without that task, starts on the same state directory
    with testing.start_runtime(after_deploy, state_dir, workers=1):
        # Then it failed at start with UnknownTask naming it, and the rest serves
        info = cpsl.TaskHandle(after_deploy, waiting.id, "retired").info()
        assert info.state == "FAILED" and info.error == ("UnknownTask", "the app has no task 'retired' any more"), info
        assert kept.submit(7).result(timeout=30) == 7


# ---- hostile input -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_never_crashes(raw):
    try:
        msg = messages.decode(raw)
    except ProtocolError:
        return
    assert isinstance(msg, messages.Message)


header_items = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                            | st.floats(allow_nan=False) | st.text(max_size=8)
                            | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=60), st.lists(header_items, max_size=8))
def test_decode_of_plausible_headers_validates_every_field(op, fields):
    raw = msgpack.packb([op, *fields], use_bin_type=True)
    try:
        msg = messages.decode(raw)
    except ProtocolError:
        return
    # whatever passed validation round-trips exactly
    assert messages.decode(msg.encode()) == msg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_hostile_frames_on_both_sockets_leave_the_runtime_serving(hostile_runtime, frames):
    endpoints, ctx = hostile_runtime
    for address in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(address)
            sock.send_multipart(frames)
            sock.send_multipart([messages.Submit(1, [["x" * 32, "nap", None, None, None, None]], [], False).encode()])
        finally:
            sock.close(0)
    assert hostile_nap.submit(1).result(timeout=30) == 1


@pytest.fixture(scope="module")
def hostile_runtime(tmp_path_factory):
    from capsule_actors import testing

    state = Path(tmp_path_factory.mktemp("h")) / "s"
    with testing.start_runtime(hostile, state, workers=1) as rt:
        info = read_runtime_file(rt.state_dir)
        assert info is not None
        ctx = zmq.Context()
        try:
            yield (info.client, info.actor), ctx
            assert read_runtime_file(rt.state_dir).pid == info.pid  # never crashed
        finally:
            ctx.term()


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Bind-mount ``path`` read-only over itself for the block (needs root, as in CI)."""
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode != 0:
        skip_or_fail(f"a read-only bind mount needs root: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_read_only_state_dir_is_a_clear_error_and_corrupts_nothing(tmp_path):
    from capsule_actors import testing

    area = tmp_path / "area"
    area.mkdir()
    state = area / "state"
    with testing.start_runtime(app, state, workers=1):
        assert nap.submit(5).result(timeout=30) == 5
    with _read_only(area):
        # a state dir that cannot be created
        with pytest.raises(cpsl.StateDirError, match="cannot create state directory"):
            app.start(state_dir=area / "new").start()
        # an existing one whose files cannot be written
        with pytest.raises(cpsl.StateDirError, match=str(state)):
            app.start(state_dir=state).start()
    import sqlite3

    db = sqlite3.connect(str(state / "capsule.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT state FROM tasks WHERE name='nap'").fetchall() == [("SUCCEEDED",)]
    finally:
        db.close()


def test_a_database_locked_by_another_writer_is_waited_out(start):
    """What happens if another process holds SQLite's write lock (say a session.db update): the
    supervisor retries (busy_timeout) and the submit is acknowledged once the lock is free."""
    import sqlite3
    import threading

    rt = start(app)
    blocker = sqlite3.connect(str(rt.state_dir / "capsule.db"), isolation_level=None, check_same_thread=False)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # take the write lock
        released = threading.Event()

        def release_later() -> None:
            time.sleep(1.0)
            blocker.execute("COMMIT")
            released.set()

        threading.Thread(target=release_later, daemon=True).start()
        h = nap.submit(11)
        assert released.is_set()  # the ack waited for the lock ...
        assert h.result(timeout=30) == 11  # ... and nothing was lost
    finally:
        blocker.close()


def test_oversized_frames_and_floods_leave_the_runtime_serving(hostile_runtime):
    endpoints, ctx = hostile_runtime
    client_address = endpoints[0]
    big = ctx.socket(zmq.DEALER)
    flood = ctx.socket(zmq.DEALER)
    try:
        for sock in (big, flood):
            sock.linger = 0
            sock.sndhwm = 0
            sock.connect(client_address)
        # a frame over max_payload_bytes + 64 KiB: ZeroMQ drops it (and that peer) at the socket
        big.send_multipart([b"\x93\x01", b"x" * (hostile.max_payload_bytes + (1 << 17))])
        # a flood of garbage headers: each one is dropped and counted, none is answered
        for i in range(5000):
            flood.send_multipart([os.urandom(16), msgpack.packb([1, i, [["x", "nap", None, None, None, None]]])])
        flood.send_multipart([messages.Status(7).encode()])
        assert flood.poll(30_000), "the supervisor stopped answering after the flood"
        reply = messages.decode(flood.recv_multipart()[0])
        assert isinstance(reply, messages.Reply) and reply.req == 7 and reply.ok
    finally:
        big.close(0)
        flood.close(0)
    assert hostile_nap.submit(3).result(timeout=30) == 3


def test_a_full_state_dir_at_start_is_a_clear_error(tmp_path):
    area = tmp_path / "tiny"
    area.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(area)], capture_output=True)
    if mounted.returncode != 0:
        skip_or_fail(f"a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        fd = os.open(area / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill the file system to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(cpsl.StateDirError):
            app.start(state_dir=area / "state").start()
    finally:
        subprocess.run(["umount", str(area)], capture_output=True)
