"""The store under pressure, with real processes: a full disk, a growing WAL, pruning at a steady
intake, and a damaged database at start (issue 24, items 5-7 and the start-up check)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, skip_or_fail, wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.store.sqlite import RESERVE, RESERVE_SUFFIX, WAL_CHECKPOINT

disk = cpsl.App("disk")


@disk.task
async def gated(gate: str) -> str:
    deadline = time.monotonic() + 90
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return "opened"


@disk.task
async def echo(x: int) -> int:
    return x


@disk.task
async def fresh(x: int) -> int:
    """Never submitted before the disk fills: its first submit waits for the supervisor's answer."""
    return x


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of our own (mounting needs root), unmounted at teardown."""
    area = tmp_path / "fs"
    area.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(area)], capture_output=True)
    if mounted.returncode != 0:
        skip_or_fail(f"a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        yield area
    finally:
        subprocess.run(["umount", "--lazy", str(area)], capture_output=True)


def fill(directory: Path, name: str) -> Path:
    """Write a file until the file system has not one block left."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return path


def status(app: cpsl.App, timeout: float = 10) -> dict[str, Any]:
    """``Runtime.status()`` with a bound on the wait."""
    body, _ = app.client().call(lambda req: messages.Status(req), timeout=timeout)
    return messages.StatusSnapshot.from_wire(body).to_wire()


def succeeded_now(app: cpsl.App) -> int | None:
    """SUCCEEDED in status, or None when no answer came within 2 s: a status that lands in the
    same turn as a write the store has no room for waits with that turn's replies (its reply
    reflects the write), and the next one, in a turn of its own, is answered."""
    try:
        return int(status(app, timeout=2)["tasks"].get("SUCCEEDED", 0))
    except TimeoutError:
        return None


def submit_until_refused(accepted: list[cpsl.TaskHandle]) -> cpsl.StoreFull:
    """Submit until the supervisor refuses; what it took before goes into ``accepted``."""

    def attempt() -> cpsl.StoreFull | None:
        try:
            accepted.append(fresh.submit(len(accepted)))
        except cpsl.StoreFull as exc:
            return exc
        time.sleep(0.05)
        return None

    refused: cpsl.StoreFull = wait_until(attempt, timeout=30)
    return refused


def test_a_full_disk_refuses_new_tasks_serves_the_rest_and_resumes_losing_nothing(tiny_fs, start, tmp_path):
    # Given a runtime whose state directory is on a small file system of its own
    state = tiny_fs / "state"
    start(disk, state_dir=state)
    gate = tmp_path / "gate"  # on another file system
    done = echo.submit(1)
    assert done.result(timeout=30) == 1
    waiting = [gated.submit(str(gate)) for _ in range(3)]
    delayed = echo.schedule(2, delay=3600)

    # When the file system fills up to its last block
    fillers = [fill(tiny_fs, "filler")]

    # Then new tasks are refused with StoreFull, naming the store and the free space
    accepted: list[cpsl.TaskHandle] = []
    refused = submit_until_refused(accepted)
    assert str(state / "capsule.db") in str(refused) and "MiB free" in str(refused), refused
    # ... while status, waits and a cancel are answered
    supervisor = status(disk)["supervisor"]
    assert supervisor["store_full"] and supervisor["free_bytes"] <= 2 * RESERVE, supervisor
    assert disk.handle(done.id).result(timeout=10) == 1
    assert [h.result(timeout=30) for h in accepted] == list(range(len(accepted)))
    assert delayed.cancel() is True

    # When even the store's reserve is gone (taken by something else) and the gated tasks finish
    (state / ("capsule.db" + RESERVE_SUFFIX)).unlink(missing_ok=True)
    fillers.append(fill(tiny_fs, "filler2"))
    succeeded = status(disk)["tasks"].get("SUCCEEDED", 0)
    gate.touch()
    # Then their outcomes are not sent while they cannot be saved, yet status is answered
    wait_until(lambda: succeeded_now(disk) == succeeded + len(waiting), timeout=30)
    with pytest.raises(TimeoutError):
        waiting[0].result(timeout=1.5)
    assert status(disk)["supervisor"]["store_full"]

    # When space is freed, then the supervisor resumes by itself: every outcome arrives ...
    for path in fillers:
        path.unlink()
    assert [h.result(timeout=30) for h in waiting] == ["opened"] * len(waiting)
    # ... new tasks are taken again
    wait_until(lambda: not status(disk)["supervisor"]["store_full"], timeout=30)
    assert fresh.submit(41).result(timeout=30) == 41
    # ... and every task acknowledged before is there and completes
    assert [h.result(timeout=30) for h in accepted] == list(range(len(accepted)))
    with pytest.raises(cpsl.TaskCancelled):
        delayed.result(timeout=10)


wal_app = cpsl.App("wal")


@wal_app.task
async def keep(blob: bytes) -> int:
    return len(blob)


class Peak:
    """Samples a file's size every 10 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, self.path.stat().st_size)


def test_the_wal_stays_under_its_limit_while_running(start, state_dir):
    # Given a runtime
    rt = start(wal_app)
    blob = os.urandom(64 << 10)
    # When 160 MiB of arguments pass through it (2,560 tasks of 64 KiB, 4 MiB every 50 ms or so)
    with Peak(state_dir / "capsule.db-wal") as wal:
        for _ in range(40):
            assert cpsl.wait_all(keep.map([(blob,)] * 64), timeout=60) == [len(blob)] * 64
            time.sleep(0.05)
    # Then its WAL stayed near the size it is checkpointed at (plus what came during one
    # checkpoint), and status says how big it and the store are
    bound = 3 * WAL_CHECKPOINT
    assert 0 < wal.peak <= bound, f"WAL peaked at {wal.peak / 2**20:.1f} MiB"
    supervisor = rt.status()["supervisor"]
    assert 0 < supervisor["wal_bytes"] <= bound and supervisor["store_bytes"] > 100 << 20, supervisor


TTL = 6.0
prune_app = cpsl.App("prune", result_ttl=TTL)


@prune_app.task
async def tiny(x: int) -> int:
    return x


def expired_but_kept(db: Path) -> int:
    """Finished tasks older than result_ttl still in the store (read-only, beside the writer)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return int(conn.execute("SELECT count(*) FROM tasks WHERE finished_at < ?", (time.time() - TTL,)).fetchone()[0])


def test_pruning_keeps_the_expired_results_bounded_at_a_steady_intake(start, state_dir):
    # Given a runtime keeping results for 6 s
    start(prune_app)
    db = state_dir / "capsule.db"
    rate, seconds = 150, 22.0  # tasks/s; every result expires within the run
    # When tasks come at a steady 150/s (15 every 0.1 s), sampling what expired but is kept
    kept, t0 = [], time.monotonic()
    for step in range(int(seconds * 10)):
        tiny.map(list(range(rate // 10)))
        if step % 5 == 0 and time.monotonic() - t0 > TTL + 2:
            kept.append(expired_but_kept(db))
        time.sleep(max(0.0, t0 + (step + 1) / 10 - time.monotonic()))
    # Then the expired-but-kept count stays within about two seconds of intake (pruned as they
    # expire, a look each second), where one pass every result_ttl let it reach ttl x rate
    assert kept and max(kept) <= 2 * rate, f"expired but kept, sampled every 0.5 s: {kept}"


check_app = cpsl.App("check")


@check_app.task
async def ballast(blob: bytes) -> int:
    return len(blob)


MODULE = textwrap.dedent("""
    import capsule_actors as cpsl

    app = cpsl.App("check-cli", workers=1, process_workers=1)


    @app.task
    async def noop():
        return None
""")


def corrupt_pages(db: Path, pages: list[int], page_size: int = 4096) -> None:
    with open(db, "r+b") as f:
        for page in pages:
            f.seek(page * page_size)
            f.write(os.urandom(page_size))


def test_a_damaged_store_is_refused_at_start_and_a_healthy_one_starts(state_dir, tmp_path):
    # Given a store of a few MiB left by a runtime that stopped (its WAL copied back in)
    blob = os.urandom(2048)
    with check_app.start(state_dir=state_dir):
        assert cpsl.wait_all(ballast.map([(blob,)] * 2000), timeout=60) == [2048] * 2000
    db = state_dir / "capsule.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # ... then a healthy store starts again
    with check_app.start(state_dir=state_dir):
        assert ballast.submit(b"x").result(timeout=30) == 1

    # When three pages in the middle of the file are overwritten with garbage
    middle = db.stat().st_size // 4096 // 2
    corrupt_pages(db, [middle, middle + 7, middle + 13])

    # Then app.start() raises StateDirError naming the file, what is wrong and what to do
    with pytest.raises(cpsl.StateDirError) as refused, check_app.start(state_dir=state_dir):
        pass
    message = str(refused.value)
    assert str(db) in message and "damaged" in message, message
    assert "backup" in message and ".recover" in message, message
    # ... and `capsule-actors run` exits non-zero with that message, without a traceback
    (tmp_path / "check_mod.py").write_text(MODULE)
    run = cli("run", "check_mod:app", state_dir=state_dir, cwd=tmp_path, timeout=60)
    assert run.returncode != 0
    assert "StateDirError" in run.stderr and "damaged" in run.stderr and str(db) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
