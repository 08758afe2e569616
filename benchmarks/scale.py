"""Scale: 100,000 tasks submitted while the workers are busy, then drained; then 100,000
passing through (batches submitted and awaited) with the supervisor's RSS sampled.

    python benchmarks/scale.py [--n 100000] [--batch 1000]

Prints the submit rate and the supervisor's RSS as the backlog grows (every 10 % of the
submits), then the time to drain the backlog and the RSS after it. The workers are held busy by
a gate task until every submit is acknowledged, so the whole backlog is queued at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import capsule_actors as cpsl

app = cpsl.App("scale", workers=2, process_workers=1, max_queued=1_000_000)


@app.task
async def noop(x: int) -> int:
    return x


@app.task
async def hold(gate: str) -> None:
    deadline = time.monotonic() + 600
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpsl-bench-") as d, app.start(state_dir=Path(d) / "s") as rt:
        sup = psutil.Process(rt.pid)
        gate = Path(d) / "gate"
        # fill every worker slot so the backlog cannot drain while we submit
        slots = 2 * 100  # workers x attempts per worker actor (WORKER_CONCURRENCY)
        blockers = hold.map([(str(gate),)] * slots)
        print(f"supervisor RSS at start: {mib(sup):.1f} MiB")
        handles: list[cpsl.TaskHandle] = []
        t0 = time.perf_counter()
        step = max(1, args.n // 10)
        while len(handles) < args.n:
            handles += noop.map(list(range(min(args.batch, args.n - len(handles)))))
            if len(handles) % step == 0:
                rate = len(handles) / (time.perf_counter() - t0)
                print(f"  {len(handles):>7} submitted  {rate:8.0f} tasks/s  supervisor RSS {mib(sup):7.1f} MiB")
        submit_s = time.perf_counter() - t0
        gate.touch()
        t1 = time.perf_counter()
        handles[-1].result(timeout=900)
        for h in handles[:: max(1, len(handles) // 100)]:
            h.result(timeout=900)
        drain_s = time.perf_counter() - t1
        for b in blockers:
            b.result(timeout=60)
        print(f"submitted {args.n} in {submit_s:.1f} s ({args.n / submit_s:.0f}/s); drained in {drain_s:.1f} s "
              f"({args.n / drain_s:.0f}/s); supervisor RSS after drain {mib(sup):.1f} MiB")
    # pass-through: never more than one batch live at a time
    with tempfile.TemporaryDirectory(prefix="cpsl-bench-") as d, app.start(state_dir=Path(d) / "s") as rt:
        sup = psutil.Process(rt.pid)
        batches = max(1, args.n // args.batch)
        t0 = time.perf_counter()
        for i in range(batches):
            cpsl.wait_all(noop.map(list(range(args.batch))), timeout=120)
            if (i + 1) % max(1, batches // 5) == 0 or i == 0:
                done = (i + 1) * args.batch
                print(f"  {done:>7} passed through  {done / (time.perf_counter() - t0):8.0f}"
                      f" tasks/s  supervisor RSS {mib(sup):7.1f} MiB")


if __name__ == "__main__":
    main()
