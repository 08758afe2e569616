"""The submit journal: a local ``submit()`` returns once its task is in the client's journal,
before the supervisor's ack. No crash of the client, the supervisor or both loses such a task,
and none makes it run twice."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors import journal as journal_module
from capsule_actors import messages
from capsule_actors.client import Client
from capsule_actors.journal import JOURNAL_DIR, Journal

HERE = Path(__file__).resolve().parent
app = cpsl.App("journal")


@app.task
async def record(i: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return i


@app.task
async def sleepy(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def _runs(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _journals(state_dir: Path) -> list[Path]:
    directory = state_dir / JOURNAL_DIR
    return sorted(p for p in directory.iterdir() if p.suffix == ".journal") if directory.exists() else []


# A client process: its first submit waits for the ack (the supervisor has accepted the task
# name); on "go" the next N are journaled; it prints their ids, then SIGKILLs itself.
CLIENT = """
import json, os, signal, sys
sys.path[:0] = [{here!r}]
import test_journal as t
from capsule_actors.connection import Connection
t.app.state_dir = {state!r}
t.record.submit(-1, {log!r}).result(timeout=30)
print("ready", flush=True)
sys.stdin.readline()
if {unsent}:  # stands in for a crash between the journal write and the send
    Connection._flush = lambda self, sock: None
handles = [t.record.submit(i, {log!r}) for i in range({n})]
assert all(h._ack is not None for h in handles), "not journaled"
print(json.dumps([h.id for h in handles]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _client(state_dir: Path, log: Path, n: int, unsent: bool, before: Callable[[], None] = lambda: None
            ) -> list[str]:
    """Run CLIENT; ``before`` runs once its first submit is in (e.g. to freeze the supervisor)."""
    code = CLIENT.format(here=str(HERE), state=str(state_dir), log=str(log), n=n, unsent=unsent)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = _readline(proc, 60)
        assert ready == "ready\n", ready + proc.communicate(timeout=5)[1]
        before()
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    return list(json.loads(out))


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or fail after ``timeout`` (never hang)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"the client printed nothing within {timeout} s")
    return proc.stdout.readline()


def test_journaled_submits_are_acked_later_and_the_file_is_emptied(start, state_dir, tmp_path):
    start(app)
    log = tmp_path / "runs"
    assert record.submit(-1, str(log)).result(timeout=30) == -1  # waited for: the name is accepted
    handles = [record.submit(i, str(log)) for i in range(200)]
    journaled = sum(h._ack is not None for h in handles)
    assert journaled >= 190  # the rest (if any) waited because earlier acks were still due
    [path] = _journals(state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [h.result(timeout=30) for h in handles] == list(range(200))
    assert sorted(_runs(log)) == list(range(-1, 200))
    # every record acknowledged: the file starts a new epoch, nothing in it would be replayed
    wait_until(lambda: journal_module._records(path.read_bytes()) == ([], None), 10)
    size = path.stat().st_size
    assert [record.submit(i, str(log)).result(timeout=30) for i in range(200, 210)] == list(range(200, 210))
    assert path.stat().st_size == size  # written over, not grown (no metadata churn per task)
    Client.close_all()
    assert not path.exists()  # and gone with a clean close


def test_the_ack_of_a_journaled_submit_does_not_wait_for_the_task(start):
    start(app)
    sleepy.submit(0).result(timeout=30)
    h = sleepy.submit(3.0)
    ack = h._ack[0] if h._ack else None
    assert ack is not None
    ack.result(timeout=1.0)  # the next commit (at most a few ms away) sends it, not the task's end
    assert not h.done()
    assert h.result(timeout=30) == 3.0


def test_map_and_the_async_twins_are_journaled_too(start, tmp_path):
    start(app)
    log = tmp_path / "runs"
    record.submit(-1, str(log)).result(timeout=30)
    mapped = record.map([(i, str(log)) for i in range(100)])
    assert all(h._ack is not None for h in mapped)

    async def scenario() -> list[int]:
        handles = await asyncio.gather(*(record.asubmit(i, str(log)) for i in range(100, 150)))
        handles += await record.amap([(i, str(log)) for i in range(150, 200)])
        assert all(h._ack is not None for h in handles)
        return list(await asyncio.gather(*handles))

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == list(range(100, 200))
    assert cpsl.wait_all(mapped, timeout=30) == list(range(100))
    assert sorted(_runs(log)) == list(range(-1, 200))


def test_a_client_killed_before_sending_loses_nothing(start, state_dir, tmp_path):
    start(app)
    log = tmp_path / "runs"
    ids = _client(state_dir, log, 40, unsent=True)
    # nothing reached the supervisor; its journal sweep finds the dead writer's file
    wait_until(lambda: len(_runs(log)) == 41, 20)
    handles = [app.handle(i) for i in ids]
    assert [h.result(timeout=30) for h in handles] == list(range(40))
    assert sorted(_runs(log)) == list(range(-1, 40))  # each once
    wait_until(lambda: not _journals(state_dir), 10)


def test_sent_and_journaled_is_recorded_once(start, state_dir, tmp_path):
    rt = start(app)
    log = tmp_path / "runs"
    try:  # frozen: the submits reach the socket, but no ack comes back
        ids = _client(state_dir, log, 40, unsent=False, before=lambda: os.kill(rt.pid, signal.SIGSTOP))
    finally:
        os.kill(rt.pid, signal.SIGCONT)
    # the supervisor gets what of the dead client's messages reached its socket, and its journal
    wait_until(lambda: len(_runs(log)) >= 41, 20)
    assert [app.handle(i).result(timeout=30) for i in ids] == list(range(40))
    wait_until(lambda: not _journals(state_dir), 10)
    # the sweep records a journal's submits before it removes the file: a task recorded a second
    # time is live by now, and once nothing is live any second run of it is in the log
    wait_until(lambda: rt.status()["supervisor"]["live_tasks"] == 0, 20)
    assert sorted(_runs(log)) == list(range(-1, 40))
    assert sum(rt.status()["tasks"].values()) == 41


def test_supervisor_killed_before_acking_then_the_client_too(start, state_dir, tmp_path):
    rt = start(app)
    log = tmp_path / "runs"
    try:
        ids = _client(state_dir, log, 40, unsent=False, before=lambda: os.kill(rt.pid, signal.SIGSTOP))
    finally:
        os.kill(rt.pid, signal.SIGKILL)
        os.kill(rt.pid, signal.SIGCONT)
    rt.process.wait(10)
    assert len(_journals(state_dir)) == 1  # the only copy of the 40 submits
    start(app)  # replays it at start
    assert [app.handle(i).result(timeout=30) for i in ids] == list(range(40))
    assert sorted(_runs(log)) == list(range(-1, 40))
    assert not _journals(state_dir)


def test_a_live_client_resends_to_a_restarted_supervisor(start, state_dir, tmp_path):
    rt = start(app)
    log = tmp_path / "runs"
    record.submit(-1, str(log)).result(timeout=30)
    os.kill(rt.pid, signal.SIGSTOP)
    try:
        handles = [record.submit(i, str(log)) for i in range(30)]
        assert all(h._ack is not None for h in handles)
    finally:
        os.kill(rt.pid, signal.SIGKILL)
        os.kill(rt.pid, signal.SIGCONT)
    rt.process.wait(10)
    start(app)  # our journal is locked (we live): we send the submits again ourselves
    assert [h.result(timeout=60) for h in handles] == list(range(30))
    assert sorted(_runs(log)) == list(range(-1, 30))


def test_replay_validates_records_and_stops_at_a_torn_tail(start, state_dir, tmp_path):
    rt = start(app)
    log = tmp_path / "runs"
    record.submit(-1, str(log)).result(timeout=30)
    journal = Journal(state_dir)  # as a client would write it
    payload = cloudpickle.dumps(((7, str(log)), {}), protocol=5)
    good = messages.Submit(1, [["a" * 32, "record", None, None, None, None]], [], True).encode()
    unknown = messages.Submit(2, [["b" * 32, "no_such_task", None, None, None, None]], [], True).encode()
    journal.append([b"\x93not a header", payload], 1)
    journal.append([unknown, payload], 1)
    journal.append([good, payload], 1)
    path = journal._segment.path
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a record cut short by a crash
    os.close(journal._segment.fd)  # as if the writer died: its lock goes
    written = path.read_bytes()
    kept = path.with_name(path.name + ".unreadable")
    wait_until(lambda: not path.exists(), 10)  # replayed within the sweep's second
    # a record it could not read (another version's, say): the file is kept aside, not removed
    assert kept.read_bytes() == written
    assert app.handle("a" * 32).result(timeout=30) == 7
    assert sorted(_runs(log)) == [-1, 7]
    with pytest.raises(cpsl.UnknownTask):
        app.handle("b" * 32).info()
    assert rt.status()["supervisor"]["pid"] == rt.pid  # and it goes on serving
    assert record.submit(8, str(log)).result(timeout=30) == 8


def test_a_journal_of_another_format_is_kept_aside_not_replayed_or_removed(start, state_dir, tmp_path):
    rt = start(app)
    log = tmp_path / "runs"
    journal = Journal(state_dir)
    payload = cloudpickle.dumps(((5, str(log)), {}), protocol=5)
    journal.append([messages.Submit(1, [["c" * 32, "record", None, None, None, None]], [], True).encode(),
                    payload], 1)
    path = journal._segment.path
    with open(path, "r+b") as f:
        f.write(b"CPSLJRN9")  # the header of a journal format this version does not know
    os.close(journal._segment.fd)  # the writer is gone
    written = path.read_bytes()
    kept = path.with_name(path.name + ".unreadable")
    wait_until(kept.exists, 10)
    assert not path.exists() and kept.read_bytes() == written
    # a later sweep: the one that replays a journal whose writer died after the file was kept
    later = Journal(state_dir)
    marker = tmp_path / "marker"
    later.append([messages.Submit(1, [["d" * 32, "record", None, None, None, None]], [], True).encode(),
                  cloudpickle.dumps(((9, str(marker)), {}), protocol=5)], 1)
    os.close(later._segment.fd)
    wait_until(lambda: not later._segment.path.exists(), 10)  # replayed and removed at that sweep's end
    assert app.handle("d" * 32).result(timeout=30) == 9
    # a kept file is never replayed
    assert kept.exists() and not log.exists()
    with pytest.raises(cpsl.UnknownTask):
        app.handle("c" * 32).info()
    assert record.submit(6, str(log)).result(timeout=30) == 6 and rt.status()["supervisor"]["pid"] == rt.pid


strict = cpsl.App("journal-strict", max_payload_bytes=2000)


@strict.task
async def size_of(x: str) -> int:
    return len(x)


def test_a_refused_journaled_submit_raises_from_result_and_records_nothing(start, state_dir):
    rt = start(strict)
    strict.max_payload_bytes = 100_000  # this client allows more than its supervisor does
    try:
        assert size_of.submit("x").result(timeout=30) == 1  # the name is accepted: journaling on
        h = size_of.submit("y" * 10_000)
        assert h._ack is not None  # returned before the supervisor's answer
        with pytest.raises(cpsl.SerializationError, match="max_payload_bytes"):
            h.result(timeout=30)
        with pytest.raises(cpsl.SerializationError):  # the same answer every time
            h.result(timeout=1)
        assert sum(rt.status()["tasks"].values()) == 1  # nothing recorded
        assert size_of.submit("z").result(timeout=30) == 1  # serving on
        Client.close_all()
        assert not _journals(state_dir)  # the refusal was an answer: nothing left to replay
    finally:
        strict.max_payload_bytes = 2000


def test_a_task_its_supervisor_lacks_fails_at_submit_every_time(start, tmp_path):
    """Journaling starts only after the supervisor accepted a name, so a client whose code has a
    task the running supervisor lacks gets UnknownTask from submit() itself, each time."""
    rt = start(app)
    log = tmp_path / "log"

    async def newer(x: int) -> int:  # added to the client's app after its supervisor started
        return x

    late = app.task(name="late")(newer)
    try:
        assert record.submit(1, str(log)).result(timeout=30) == 1
        assert record.submit(2, str(log))._ack is not None  # a known name is journaled
        for _ in range(3):
            with pytest.raises(cpsl.UnknownTask, match="late"):
                late.submit(3)
        with pytest.raises(cpsl.UnknownTask, match="late"):
            late.map([(4,), (5,)])
        assert sum(rt.status()["tasks"].values()) == 2  # nothing of "late" recorded
        assert record.submit(6, str(log)).result(timeout=30) == 6  # serving on
    finally:
        del app.tasks["late"]
