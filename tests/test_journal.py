"""The submit journal: a local ``submit()`` returns once its task is in the client's journal,
before the supervisor's ack. No crash of the client, the supervisor or both loses such a task,
and none makes it run twice."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import msgpack
import pytest
from conftest import skip_or_fail, wait_until

import capsule_actors as cpsl
from capsule_actors import journal as journal_module
from capsule_actors import messages
from capsule_actors.app import new_task_id
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
    wait_until(lambda: journal_module.read_contents(path.read_bytes()) == journal_module.Contents(), 10)
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


# ---- damaged journals (issue 24, item 3) -----------------------------------------------------

def _offsets(data: bytes) -> list[int]:
    """Where each record of an intact, freshly written journal begins."""
    offsets, pos = [], 16  # after the file's header: <8s magic><u64 epoch>
    while pos + 16 <= len(data):
        length, _, _ = struct.unpack_from("<IIQ", data, pos)
        offsets.append(pos)
        pos += 16 + length
    assert pos == len(data), "not a freshly written journal"
    return offsets


def _logged(capfd: pytest.CaptureFixture[str], seen: list[str], text: str) -> str:
    """What the supervisor (our stderr's heir) has logged so far, once it contains ``text``."""
    seen.append(capfd.readouterr().err)
    everything = "".join(seen)
    return everything if text in everything else ""


def test_a_damaged_record_costs_only_itself_and_the_file_is_kept(start, state_dir, tmp_path, capfd):
    rt = start(app)
    log = tmp_path / "runs"
    try:  # frozen: nothing replays the journal before it is damaged
        # Given a client that journaled 5 submits, sent none of them, and died
        ids = _client(state_dir, log, 5, unsent=True, before=lambda: os.kill(rt.pid, signal.SIGSTOP))
        [path] = _journals(state_dir)
        offsets = _offsets(path.read_bytes())
        assert len(offsets) == 5
        # ... and one bit of its second record flipped (on disk, after the fact)
        with open(path, "r+b") as f:
            f.seek(offsets[1] + 40)
            byte = f.read(1)[0]
            f.seek(offsets[1] + 40)
            f.write(bytes([byte ^ 0x01]))
        damaged = path.read_bytes()
    finally:
        os.kill(rt.pid, signal.SIGCONT)

    # When the supervisor replays it, then the file is kept aside, as it was
    kept = path.with_name(path.name + ".unreadable")
    wait_until(kept.exists, 20)
    assert not path.exists() and kept.read_bytes() == damaged
    # ... every intact record, before and after the damaged one, is recorded and runs once
    assert [app.handle(ids[i]).result(timeout=30) for i in (0, 2, 3, 4)] == [0, 2, 3, 4]
    with pytest.raises(cpsl.UnknownTask):
        app.handle(ids[1]).info()
    wait_until(lambda: rt.status()["supervisor"]["live_tasks"] == 0, 20)
    assert sorted(_runs(log)) == [-1, 0, 2, 3, 4]
    # ... and the log says what was skipped, where
    seen: list[str] = []
    text = wait_until(lambda: _logged(capfd, seen, " is damaged: "), 10)
    size = offsets[2] - offsets[1]
    assert f"journal {path.name} is damaged: skipped {size} bytes at offset {offsets[1]} (1 record)" in text
    assert kept.name in text
    # ... and a kept file is never replayed again (nothing runs twice)
    _more_sweeps(state_dir)
    assert sorted(_runs(log)) == [-1, 0, 2, 3, 4] and kept.exists()


def _more_sweeps(state_dir: Path, n: int = 2) -> None:
    """Until the supervisor's journal sweep has run ``n`` more times: each sweep ends by removing
    stale temporary journals, so a marker that goes proves one; of ``n`` markers made one after
    the other, all sweeps but the first ran whole after this call began."""
    directory = state_dir / JOURNAL_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    for i in range(n):
        marker = directory / f".{4300 + i}-dddddddddddd.tmp"
        marker.write_bytes(b"")
        os.utime(marker, (time.time() - 3600, time.time() - 3600))
        wait_until(lambda marker=marker: not marker.exists(), 10)


def _frames(log: Path, items: list[tuple[str, int]]) -> list[bytes]:
    """A journaled Submit of ``record(i, log)`` for each (task id, i)."""
    header = messages.Submit(1, [[tid, "record", None, None, None, None] for tid, _ in items], [], True).encode()
    return [header, *(cloudpickle.dumps(((i, str(log)), {}), protocol=5) for _, i in items)]


def test_a_torn_last_record_and_acknowledged_leftovers_end_the_file_quietly(start, state_dir, tmp_path, capfd):
    rt = start(app)
    log = tmp_path / "runs"
    journal = Journal(state_dir)  # as a client writes it
    # Given three big records, all acknowledged: the file starts epoch 2 over them
    old_ids = [new_task_id() for _ in range(24)]
    acked = [journal.append(_frames(log, [(old_ids[8 * r + k], 100 + 8 * r + k) for k in range(8)]), 8)
             for r in range(3)]
    for seg in acked:
        journal.acked(seg, 8)
    seg = journal._segment
    assert seg.epoch == 2 and seg.pos == 16
    # ... then one small record of epoch 2, written over the start of the first old one
    current, torn = new_task_id(), new_task_id()
    journal.append(_frames(log, [(current, 1)]), 1)
    # ... and the writer killed in the middle of its next record (its first half reached the file)
    body = msgpack.packb(_frames(log, [(torn, 2)]), use_bin_type=True)
    record_bytes = struct.pack("<IIQ", len(body), zlib.crc32(body), seg.epoch) + body
    os.pwrite(seg.fd, record_bytes[: len(record_bytes) // 2], seg.pos)
    path = seg.path
    assert len(path.read_bytes()) > seg.pos + len(record_bytes)  # old records of epoch 1 follow
    os.close(seg.fd)  # the writer is gone: its lock with it

    # When the supervisor replays it, then the current record is recorded and the file removed:
    # a torn tail is the normal end of a journal, not damage
    wait_until(lambda: not path.exists(), 10)
    assert not path.with_name(path.name + ".unreadable").exists()
    assert app.handle(current).result(timeout=30) == 1
    # ... and neither the torn record nor any acknowledged record of the old epoch is replayed
    wait_until(lambda: rt.status()["supervisor"]["live_tasks"] == 0, 20)
    assert _runs(log) == [1]
    for task_id in (torn, *old_ids):
        with pytest.raises(cpsl.UnknownTask):
            app.handle(task_id).info()
    assert " is damaged" not in "".join(capfd.readouterr())


# ---- temporary journal files (issue 24, item 5's journal part) -------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Path:
    """A 64 KiB tmpfs, mounted for the test and unmounted after (a disk that fills at once)."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs (to fill a real file system) needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:  # lazily if a file on it is still open (a leaked descriptor: the test fails anyway)
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30, check=True)


def _fill(mount: Path) -> Path:
    """Write to ``mount`` until its file system is full; the file that filled it."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(1000):  # 64 KiB fill in 16 writes; bounded anyway
                os.write(fd, b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_journal_that_cannot_be_made_leaves_no_temporary_file(small_fs, monkeypatch):
    state = small_fs / "state"
    state.mkdir(mode=0o700)
    journal = Journal(state)  # made while there is room
    journal.append([b"header", b"payload"], 1)
    directory = state / JOURNAL_DIR
    fds = _open_fds()
    filler = _fill(small_fs)

    # When a new journal cannot be written on the full disk, then it fails and leaves nothing
    with pytest.raises(OSError) as failed:
        Journal(state)
    assert failed.value.errno == errno.ENOSPC
    # ... nor does the next segment of a journal in use, which goes on in its current one
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 0)  # the current segment is "full"
    with pytest.raises(OSError):
        journal.append([b"header", b"payload"], 1)
    assert sorted(p.name for p in directory.iterdir()) == [journal._segment.path.name]
    assert _open_fds() == fds  # and no descriptor leaks

    # When space comes back, then the journal goes on, and closes cleanly
    filler.unlink()
    journal.append([b"header", b"payload"], 1)
    assert len(list(directory.iterdir())) == 2 and not [p for p in directory.iterdir() if p.suffix == ".tmp"]
    journal.close()


def test_the_sweep_removes_stale_temporary_journals_whose_lock_is_free(start, state_dir, capfd):
    start(app)
    directory = state_dir / JOURNAL_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    an_hour_ago = time.time() - 3600

    def temp(name: str, mtime: float | None) -> Path:
        path = directory / f".{name}.tmp"
        path.write_bytes(b"")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    # Given the temporary file of a writer that died making its journal an hour ago, one being
    # made right now, and an old one whose writer still holds its lock
    stale = temp("4242-aaaaaaaaaaaa", an_hour_ago)
    young = temp("4243-bbbbbbbbbbbb", None)
    held = temp("4244-cccccccccccc", an_hour_ago)
    fd = os.open(held, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

        # Then the supervisor's sweep removes the stale one, and says so
        wait_until(lambda: not stale.exists(), 10)
        seen: list[str] = []
        wait_until(lambda: _logged(capfd, seen, f"removed {stale.name}"), 10)
        _more_sweeps(state_dir)
        assert young.exists() and held.exists()
    finally:
        os.close(fd)  # its writer is gone now
    wait_until(lambda: not held.exists(), 10)
    assert young.exists()
