"""Schedule jitter: how late cron firings and delayed tasks start, and the runtime's idle CPU.

    python benchmarks/schedule_jitter.py [--seconds 10] [--delayed 1000]

Prints p50/p99/max lateness of (1) a seconds-level cron schedule (task start minus its slot),
(2) --delayed tasks scheduled with at= over a few seconds (task start minus its run_at), and
(3) the CPU of the supervisor and all its descendants while idle with 100 schedules registered,
as a percentage of one core. Targets (issue 5): p99 lateness <= 20 ms on an idle machine; idle
CPU under 1 %.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import capsule_actors as cpsl

LOG = os.environ.setdefault("CPSL_JITTER_LOG", tempfile.mktemp(prefix="cpsl-jitter-"))

jitter = cpsl.App("jitter", workers=1, process_workers=1)


@jitter.schedule("* * * * * *")
async def every_second() -> None:
    now = time.time()
    with open(os.environ["CPSL_JITTER_LOG"], "a") as fh:
        fh.write(json.dumps({"kind": "cron", "late": now - int(now)}) + "\n")


@jitter.task
async def delayed(run_at: float) -> None:
    with open(os.environ["CPSL_JITTER_LOG"], "a") as fh:
        fh.write(json.dumps({"kind": "delayed", "late": time.time() - run_at}) + "\n")


idle = cpsl.App("idle", workers=1, process_workers=1)
for _i in range(100):
    idle.schedule("0 0 1 1 *", name=f"yearly_{_i}")(lambda: None)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def row(name: str, lates: list[float]) -> str:
    ms = [x * 1000 for x in lates]
    return f"{name:<28} n={len(ms):<5} p50 {pct(ms, .5):7.2f} ms  p99 {pct(ms, .99):7.2f} ms  max {max(ms):7.2f} ms"


def measure_jitter(seconds: float, n_delayed: int) -> None:
    Path(LOG).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="cpsl-bench-") as d, jitter.start(state_dir=Path(d) / "s"):
        base = time.time() + 1.0
        handles = []
        for _ in range(n_delayed):
            run_at = base + random.uniform(0, max(1.0, seconds - 2))
            handles.append(delayed.schedule(run_at, at=dt.datetime.fromtimestamp(run_at, dt.UTC)))
        deadline = time.monotonic() + seconds + 30
        for h in handles:
            h.result(timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(max(0.0, base + seconds - time.time()))
    entries = [json.loads(line) for line in Path(LOG).read_text().splitlines()]
    Path(LOG).unlink(missing_ok=True)
    print(row("cron every second", [e["late"] for e in entries if e["kind"] == "cron"]))
    print(row(f"{n_delayed} delayed tasks (at=)", [e["late"] for e in entries if e["kind"] == "delayed"]))


def measure_idle_cpu(window: float) -> None:
    with tempfile.TemporaryDirectory(prefix="cpsl-bench-") as d, idle.start(state_dir=Path(d) / "s") as rt:
        time.sleep(1.0)  # let start-up settle
        sup = psutil.Process(rt.pid)
        procs = [sup, *sup.children(recursive=True)]

        def cpu() -> float:
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total

        c0, t0 = cpu(), time.monotonic()
        time.sleep(window)
        used, wall = cpu() - c0, time.monotonic() - t0
    print(f"idle CPU, 100 schedules, {len(procs)} processes: {100 * used / wall:.2f} % of one core "
          f"over {wall:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--delayed", type=int, default=1000)
    parser.add_argument("--idle-window", type=float, default=10.0)
    args = parser.parse_args()
    print(f"schedule jitter on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    measure_jitter(args.seconds, args.delayed)
    measure_idle_cpu(args.idle_window)


if __name__ == "__main__":
    main()
