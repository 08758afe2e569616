"""Soak: a steady stream of tiny tasks, then of tasks with 8 KiB arguments, through one runtime
with a short result_ttl, watching what must stay bounded: the WAL, the store, the loop's latency
and the expired results waiting to be pruned.

    python benchmarks/soak.py [--tiny 100000] [--big 20000] [--rate 1000] [--ttl 10] [--workers 2]

A load process submits at a steady ``--rate`` (a ``map()`` every 10 ms, never waiting for
results: as an app that fires tasks off). This process owns the runtime and samples, beside it:

- every 0.25 s: the sizes of ``capsule.db`` and ``capsule.db-wal`` (stat), the supervisor's RSS;
- every 0.5 s, read-only SQL beside the writer: the expired-but-kept tasks (finished before
  now - ttl) and the tasks pruned so far (``max(rowid) - count(*)``: rowids only grow);
- every 20 ms, the loop's latency: the round trip of an ``Info`` request for an unknown id, which
  the supervisor's loop answers itself with one indexed lookup (so it waits for whatever the loop
  is doing: a commit, a checkpoint, a pruning batch), from this process's own connection;
- every 100 ms, a probe task's ``submit()`` -> ``result()`` (end to end, through a worker).

After the load it waits ``ttl`` + 5 s for the pruning to catch up, then prints each phase's
numbers. Every process is stopped by pid (the load process, the runtime's tree).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

from _common import (  # noqa: E402
    Deadline,
    Watchdog,
    die_with_parent,
    kill_tree,
    percentile,
    print_machine,
    print_package,
    run_script,
    stop_tree,
    temp_dir,
)

import capsule_actors as cpsl  # noqa: E402
from capsule_actors import messages  # noqa: E402

app = cpsl.App("bench-soak", grace=2.0)
BIG = os.urandom(8192)


@app.task
async def tiny(x: int) -> int:
    return x


@app.task
async def big(blob: bytes) -> int:
    return len(blob)


@app.task
async def probe() -> None:
    return None


# ---- the load process --------------------------------------------------------------------------


def load_main(args: argparse.Namespace) -> int:
    """Submit ``--tiny`` then ``--big`` tasks at ``--rate``; say each phase on stdout."""
    die_with_parent()
    deadline = Deadline(args.deadline, "the load process")
    tiny.submit(0).result(timeout=60)  # connected, and the names accepted (journaled from now on)
    big.submit(b"").result(timeout=60)
    last: list[cpsl.TaskHandle] = []
    for phase, task, arg, n in (("tiny", tiny, 1, args.tiny), ("big", big, BIG, args.big)):
        print(f"phase {phase}", flush=True)
        t0, sent, tick = time.monotonic(), 0, 0
        per_tick = max(1, args.rate // 100)
        while sent < n:
            batch = min(per_tick, n - sent)
            last = task.map([(arg,)] * batch)
            sent += batch
            tick += 1
            time.sleep(max(0.0, t0 + tick / 100 - time.monotonic()))
            if tick % 100 == 0:
                deadline.left()
        print(f"sent {phase} {n} {n / (time.monotonic() - t0):.0f}", flush=True)
    for h in last:
        h.result(timeout=deadline.left())
    print("done", flush=True)
    return 0


# ---- sampling beside the runtime ---------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    sent: int = 0
    rate: float = 0.0
    wal_peak: int = 0
    db_peak: int = 0
    rss_peak: int = 0
    kept_peak: int = 0
    pruned: list[tuple[float, int]] = field(default_factory=list)
    loop_rtt: list[float] = field(default_factory=list)
    task_rtt: list[float] = field(default_factory=list)


class Samplers:
    """Threads that sample the store's files, the store's rows, the loop and a probe task."""

    def __init__(self, state_dir: Path, ttl: float, sup_pid: int) -> None:
        import psutil

        self.db, self.wal = state_dir / "capsule.db", state_dir / "capsule.db-wal"
        self.ttl = ttl
        self.sup = psutil.Process(sup_pid)
        self.phases = [Phase("start", time.monotonic())]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._every, args=(0.25, self._files), daemon=True),
            threading.Thread(target=self._every, args=(0.5, self._rows), daemon=True),
            threading.Thread(target=self._every, args=(0.02, self._loop), daemon=True),
            threading.Thread(target=self._every, args=(0.1, self._task), daemon=True),
        ]

    @property
    def now(self) -> Phase:
        return self.phases[-1]

    def begin(self, name: str) -> None:
        self.now.end = time.monotonic()
        self.phases.append(Phase(name, time.monotonic()))

    def __enter__(self) -> Samplers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.now.end = time.monotonic()
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _every(self, period: float, sample: Callable[[], None]) -> None:
        while not self.stop.wait(period):
            with contextlib.suppress(Exception):  # a sample that fails (say, at stop) is skipped
                sample()

    def _files(self) -> None:
        phase = self.now
        with contextlib.suppress(FileNotFoundError):
            phase.wal_peak = max(phase.wal_peak, self.wal.stat().st_size)
        phase.db_peak = max(phase.db_peak, self.db.stat().st_size)
        phase.rss_peak = max(phase.rss_peak, self.sup.memory_info().rss)

    def _rows(self) -> None:
        phase = self.now
        uri = f"file:{self.db}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
            kept = conn.execute("SELECT count(*) FROM tasks WHERE finished_at < ?", (time.time() - self.ttl,))
            phase.kept_peak = max(phase.kept_peak, int(kept.fetchone()[0]))
            top, rows = conn.execute("SELECT coalesce(max(rowid), 0), count(*) FROM tasks").fetchone()
        phase.pruned.append((time.monotonic(), int(top) - int(rows)))

    def _loop(self) -> None:
        t0 = time.perf_counter()
        app.client().call(lambda req: messages.Info(req, ["0" * 32]), timeout=30)
        self.now.loop_rtt.append(time.perf_counter() - t0)

    def _task(self) -> None:
        t0 = time.perf_counter()
        probe.submit().result(timeout=30)
        self.now.task_rtt.append(time.perf_counter() - t0)


def prune_rate(phase: Phase) -> float:
    if len(phase.pruned) < 2:
        return 0.0
    (t0, n0), (t1, n1) = phase.pruned[0], phase.pruned[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def ms(values: list[float], pct: float | None = None) -> str:
    if not values:
        return "-"
    return f"{(max(values) if pct is None else percentile(values, pct)) * 1000:.1f}"


def report(samplers: Samplers, ttl: float) -> None:
    mib = 2**20
    header = (
        f"{'phase':<10} {'tasks':>7} {'sent/s':>7} {'WAL peak MiB':>12} {'db peak MiB':>11} {'RSS MiB':>7} "
        f"{'expired kept':>12} {'pruned/s':>8} {'loop p99 ms':>11} {'loop max ms':>11} {'probe p99':>9} "
        f"{'probe max':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for p in samplers.phases[1:]:
        print(
            f"{p.name:<10} {p.sent:>7} {p.rate:>7.0f} {p.wal_peak / mib:>12.1f} {p.db_peak / mib:>11.1f} "
            f"{p.rss_peak / mib:>7.1f} {p.kept_peak:>12} {prune_rate(p):>8.0f} {ms(p.loop_rtt, 99):>11} "
            f"{ms(p.loop_rtt):>11} {ms(p.task_rtt, 99):>9} {ms(p.task_rtt):>9}"
        )
    loop = [v for p in samplers.phases[1:] for v in p.loop_rtt]
    print(
        f"\nloop latency over the run: {len(loop)} Info round trips, p50 {ms(loop, 50)} ms, "
        f"p99 {ms(loop, 99)} ms, max {ms(loop)} ms"
    )
    print(f"'expired kept': finished more than ttl={ttl:g} s ago, still in the store (peak of samples)")


def start_load(args: argparse.Namespace, state_dir: Path, deadline: Deadline) -> subprocess.Popen[str]:
    """The load process (this script with --load), sending to the runtime on ``state_dir``."""
    env = dict(os.environ, CAPSULE_STATE_DIR=str(state_dir), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load", "--tiny", str(args.tiny), "--big", str(args.big)]
    cmd += ["--rate", str(args.rate), "--deadline", str(deadline.left())]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def follow(load: subprocess.Popen[str], samplers: Samplers, deadline: Deadline) -> None:
    """Start a phase of samples each time the load process starts one; return when it is done."""
    assert load.stdout is not None
    for line in load.stdout:
        word = line.split()
        if word[0] == "phase":
            samplers.begin(word[1])
        elif word[0] == "sent":
            samplers.now.sent, samplers.now.rate = int(word[2]), float(word[3])
        elif word[0] == "done":
            break
        deadline.left()
    if load.wait(deadline.left()) != 0:
        raise RuntimeError(f"the load process exited with {load.returncode}")


def run(args: argparse.Namespace, dog: Watchdog) -> int:
    deadline = Deadline(args.deadline, "soak.py")
    app.result_ttl = args.ttl
    with temp_dir("cpsl-soak-") as tmp, app.start(state_dir=tmp / "s", workers=args.workers, process_workers=1) as rt:
        pid = rt.pid or 0
        dog.on_expire(lambda: kill_tree(pid))
        load = start_load(args, tmp / "s", deadline)
        dog.on_expire(lambda: stop_tree(load, grace=1.0))
        try:
            with Samplers(tmp / "s", args.ttl, pid) as samplers:
                follow(load, samplers, deadline)
                samplers.begin("drain")
                time.sleep(args.ttl + 5)
                final = rt.status()["supervisor"]
        finally:
            stop_tree(load, grace=1.0)
    kill_tree(pid)  # anything the graceful stop left
    report(samplers, args.ttl)
    print(
        f"at the end: capsule.db {final['store_bytes'] / 2**20:.1f} MiB, WAL {final['wal_bytes'] / 2**20:.1f} MiB "
        f"(status), supervisor RSS {final['rss'] / 2**20:.1f} MiB"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=int, default=100_000, help="tiny tasks (default 100000)")
    parser.add_argument("--big", type=int, default=20_000, help="tasks with 8 KiB arguments (default 20000)")
    parser.add_argument("--rate", type=int, default=1000, help="tasks submitted per second (default 1000)")
    parser.add_argument("--ttl", type=float, default=10.0, help="the App's result_ttl, seconds (default 10)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=900.0, help="hard limit on the whole run, seconds")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load_main(args)
    print(
        f"capsule_actors {cpsl.__version__} soak: {args.tiny} tiny tasks then {args.big} with 8 KiB arguments "
        f"at {args.rate}/s, result_ttl={args.ttl:g} s, workers={args.workers}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}  SQLite {sqlite3.sqlite_version}")
    print_package(Path(cpsl.__file__).parent)
    print_machine()
    with Watchdog(args.deadline + 60, "soak.py") as dog:
        return run(args, dog)


if __name__ == "__main__":
    run_script(main, __file__)
