"""Round-trip latency of a no-op task through capsule_actors, next to the raw-pyzmq floor.

    /work/venv/bin/python benchmarks/latency.py [--n 300] [--warmup 50] [--workers 2] [--no-floor]

After a warm-up, N sequential round trips, one task in flight at a time:

  submit -> result        ``noop.submit(i).result()``: the durable submit (one request to the
                          supervisor, answered after the SQLite commit), then the wait for the
                          result (a second request, answered when the actor reports it).
    of which the ack      the ``submit()`` call alone (until the handle is returned).
  process=True            the same for a ``process=True`` no-op (process-isolated actors).
  floor                   raw pyzmq: one acked send to a Python ROUTER process that forwards to
                          2 worker processes over ipc://, then the pushed result.

Prints p50, p99 and max in milliseconds for each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common, when this file is imported rather than run
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

import capsule_actors as cpsl  # noqa: E402
from _common import Deadline, Floor, percentile, print_machine, temp_dir  # noqa: E402

app = cpsl.App("bench-latency", grace=2.0)


@app.task
async def noop(x: Any) -> Any:
    """The no-op the worker actors run (on their event loop)."""
    return x


@app.task(process=True)
def pnoop(x: Any) -> Any:
    """The no-op the process-isolated actors run."""
    return x


def floor_noop(x: Any) -> Any:
    return x


# ---- one sample each: (total seconds, seconds until the submit was acknowledged) -------------

Sample = tuple[float, float]


def _round_trip(task: cpsl.Task[Any, Any], i: int, deadline: Deadline) -> Sample:
    t0 = time.perf_counter()
    h = task.submit(i)
    t1 = time.perf_counter()
    value = h.result(timeout=deadline.left())
    t2 = time.perf_counter()
    if value != i:
        raise AssertionError(f"{task.name}({i}) returned {value!r}")
    return t2 - t0, t1 - t0


def _floor_round_trip(floor: Floor, i: int, deadline: Deadline) -> Sample:
    results: dict[bytes, Any] = {}
    t0 = time.perf_counter()
    req = floor.submit(floor_noop, (i,), results, deadline)
    t1 = time.perf_counter()
    (value,) = floor.collect([req], results, deadline)
    t2 = time.perf_counter()
    if value != i:
        raise AssertionError(f"floor({i}) returned {value!r}")
    return t2 - t0, t1 - t0


def sample(label: str, one: Callable[[int, Deadline], Sample], n: int, warmup: int,
           budget: float) -> list[Sample]:
    deadline = Deadline(budget, label)
    for i in range(warmup):
        one(i, deadline)
    return [one(i, deadline) for i in range(n)]


def stats(values: list[float]) -> tuple[float, float, float]:
    ms = [v * 1000.0 for v in values]
    return percentile(ms, 50), percentile(ms, 99), max(ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="measured round trips (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="round trips before measuring (default 50)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker actors, and process-isolated actors (default: CPU count)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the raw-pyzmq floor (default: on)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds allowed per scenario (default 30 + 0.05 * (n + warmup))")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--n and --workers must be >= 1, --warmup >= 0")
    budget = args.deadline or 30.0 + 0.05 * (args.n + args.warmup)

    print(f"capsule_actors {cpsl.__version__} latency: no-op task, {args.n} sequential round trips "
          f"after {args.warmup} warm-up, workers={args.workers}, process_workers={args.workers}")
    print_machine()
    rows: list[tuple[str, list[float]]] = []
    started = time.monotonic()
    with temp_dir() as tmp:
        with app.start(state_dir=tmp / "s", workers=args.workers, process_workers=args.workers):
            samples = sample("submit -> result", lambda i, d: _round_trip(noop, i, d), args.n, args.warmup, budget)
            rows.append(("submit -> result", [s[0] for s in samples]))
            rows.append(("  of which submit() ack", [s[1] for s in samples]))
            samples = sample("process=True", lambda i, d: _round_trip(pnoop, i, d), args.n, args.warmup, budget)
            rows.append(("process=True submit -> result", [s[0] for s in samples]))
        if args.floor:
            with Floor(tmp, n_workers=2) as floor:
                samples = sample("floor", lambda i, d: _floor_round_trip(floor, i, d), args.n, args.warmup, budget)
                rows.append(("floor: pyzmq send -> ack -> result", [s[0] for s in samples]))
                rows.append(("  of which the ack", [s[1] for s in samples]))

    floor_p50 = next((stats(v)[0] for k, v in rows if k.startswith("floor")), None)
    print()
    header = f"{'scenario':<36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  {'p50 vs floor':>12}"
    print(header)
    print("-" * len(header))
    for label, values in rows:
        p50, p99, mx = stats(values)
        ratio = "" if floor_p50 is None or label.startswith(("floor", "  ")) else f"{p50 / floor_p50:.1f}x"
        print(f"{label:<36} {p50:>8.3f} {p99:>8.3f} {mx:>8.3f}  {ratio:>12}")
    print()
    print(f"total wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:  # a scenario ran past its deadline; everything was stopped
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        sys.exit(2)
