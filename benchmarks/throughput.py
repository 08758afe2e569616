"""Throughput of a no-op task through capsule_actors, next to the raw-pyzmq floor.

    /work/venv/bin/python benchmarks/throughput.py [--n 2000] [--repeat 3] [--workers 2]
                                                   [--process-workers N] [--no-floor]

Variants (each one: N tasks of a no-op that returns its argument; the clock runs from the first
submit until the last result is in the caller's hands; every result is checked):

  A  submit() loop      N sequential ``noop.submit(i)`` (each returns after the durable ack),
                        then ``h.result()`` of every handle in order.
  B  map()              ``noop.map(range(N))``: one durable batch, then every ``h.result()``.
  C  asubmit() gather   ``asyncio.gather`` of N ``noop.asubmit(i)``, then ``gather`` of the handles.
  D  process=True map() the same as B for a ``process=True`` no-op (process-isolated actors).
  floor A               raw pyzmq: a Python ROUTER process + 2 worker processes over ipc://, the
                        same shape as A (N acked sends back to back, then every result).
  floor pipelined       the floor without waiting for each ack (N sends, then every result).

Prints tasks/s (median of --repeat runs) for each, and A-D as a fraction of floor A.
"""

from __future__ import annotations

import argparse
import asyncio
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
from _common import Deadline, Floor, median, print_machine, temp_dir  # noqa: E402

app = cpsl.App("bench-throughput", grace=2.0)


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


# ---- one measured run of each variant; each returns (total seconds, submit-phase seconds) ----

Run = tuple[float, float]


def _check(results: list[Any], n: int, what: str) -> None:
    if results != list(range(n)):
        bad = next(i for i, r in enumerate(results) if r != i) if len(results) == n else len(results)
        raise AssertionError(f"{what}: wrong results (first bad index {bad})")


def run_submit_loop(n: int, deadline: Deadline) -> Run:
    t0 = time.perf_counter()
    handles = []
    for i in range(n):
        handles.append(noop.submit(i))
        if i % 64 == 0:
            deadline.left()
    t1 = time.perf_counter()
    results = [h.result(timeout=deadline.left()) for h in handles]
    t2 = time.perf_counter()
    _check(results, n, "submit() loop")
    return t2 - t0, t1 - t0


def _run_map(task: cpsl.Task[Any, Any], n: int, deadline: Deadline, what: str, bulk: bool = False) -> Run:
    t0 = time.perf_counter()
    handles = task.map(range(n))
    t1 = time.perf_counter()
    if bulk:
        results = cpsl.wait_all(handles, timeout=deadline.left())
    else:
        results = [h.result(timeout=deadline.left()) for h in handles]
    t2 = time.perf_counter()
    _check(results, n, what)
    return t2 - t0, t1 - t0


def run_map(n: int, deadline: Deadline) -> Run:
    return _run_map(noop, n, deadline, "map()")


def run_map_bulk(n: int, deadline: Deadline) -> Run:
    return _run_map(noop, n, deadline, "map() + wait_all()", bulk=True)


def run_process_map(n: int, deadline: Deadline) -> Run:
    return _run_map(pnoop, n, deadline, "process=True map()", bulk=True)


def run_asubmit(n: int, deadline: Deadline) -> Run:
    async def scenario() -> Run:
        t0 = time.perf_counter()
        handles = await asyncio.gather(*(noop.asubmit(i) for i in range(n)))
        t1 = time.perf_counter()
        results = list(await asyncio.gather(*handles))
        t2 = time.perf_counter()
        _check(results, n, "asubmit() gather")
        return t2 - t0, t1 - t0

    async def bounded() -> Run:
        return await asyncio.wait_for(scenario(), deadline.left())

    return asyncio.run(bounded())


def run_floor_acked(floor: Floor, n: int, deadline: Deadline) -> Run:
    results: dict[bytes, Any] = {}
    t0 = time.perf_counter()
    reqs = [floor.submit(floor_noop, (i,), results, deadline) for i in range(n)]
    t1 = time.perf_counter()
    values = floor.collect(reqs, results, deadline)
    t2 = time.perf_counter()
    _check(values, n, "floor A")
    return t2 - t0, t1 - t0


def run_floor_pipelined(floor: Floor, n: int, deadline: Deadline) -> Run:
    results: dict[bytes, Any] = {}
    t0 = time.perf_counter()
    reqs = [floor.send_only(floor_noop, (i,)) for i in range(n)]
    t1 = time.perf_counter()
    values = floor.collect(reqs, results, deadline)
    t2 = time.perf_counter()
    _check(values, n, "floor pipelined")
    return t2 - t0, t1 - t0


# ---- driver ----------------------------------------------------------------------------------

VARIANTS: list[tuple[str, str, Callable[[int, Deadline], Run]]] = [
    ("A", "submit() loop, then results", run_submit_loop),
    ("B", "map() one batch, then results", run_map),
    ("B2", "map() one batch, wait_all()", run_map_bulk),
    ("C", "asubmit() x N gather, then awaited", run_asubmit),
    ("D", "process=True map(), wait_all()", run_process_map),
]


def measure(label: str, fn: Callable[[int, Deadline], Run], n: int, repeat: int,
            budget: float) -> dict[str, Any]:
    runs = [fn(n, Deadline(budget, label)) for _ in range(repeat)]
    rates = [n / total for total, _ in runs]
    submit_rates = [n / sub for _, sub in runs]
    return {"rate": median(rates), "rates": rates, "submit_rate": median(submit_rates)}


def warm_up(deadline: Deadline, process_workers: int) -> None:
    """Every actor up and every code path imported before the clock starts."""
    for h in [noop.submit(-1) for _ in range(20)] + noop.map(range(50)):
        h.result(timeout=deadline.left())
    for h in pnoop.map(range(10 * process_workers)):
        h.result(timeout=deadline.left())
    asyncio.run(asyncio.wait_for(_awarm(), deadline.left()))


async def _awarm() -> None:
    await asyncio.gather(*[await noop.asubmit(i) for i in range(20)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="tasks per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is shown (default 3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker actors (default: CPU count)")
    parser.add_argument("--process-workers", type=int, default=None,
                        help="process-isolated actors (default: same as --workers)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the raw-pyzmq floor (default: on)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds allowed per run of one variant (default 30 + n/100)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1 or args.workers < 1:
        parser.error("--n, --repeat and --workers must be >= 1")
    process_workers = args.process_workers or args.workers
    budget = args.deadline or 30.0 + args.n / 100.0

    print(f"capsule_actors {cpsl.__version__} throughput: no-op task, n={args.n}, "
          f"median of {args.repeat}, workers={args.workers}, process_workers={process_workers}")
    print_machine()
    rows: list[tuple[str, str, dict[str, Any]]] = []
    started = time.monotonic()
    with temp_dir() as tmp:
        with app.start(state_dir=tmp / "s", workers=args.workers, process_workers=process_workers):
            warm_up(Deadline(60.0, "warm-up"), process_workers)
            for key, label, fn in VARIANTS:
                rows.append((key, label, measure(label, fn, args.n, args.repeat, budget)))
        if args.floor:
            with Floor(tmp, n_workers=2) as floor:
                warm = Deadline(30.0, "floor warm-up")
                run_floor_acked(floor, 100, warm)
                run_floor_pipelined(floor, 100, warm)
                rows.append(("floor A", "pyzmq ROUTER + 2 workers, acked sends",
                             measure("floor A", lambda n, d: run_floor_acked(floor, n, d),
                                     args.n, args.repeat, budget)))
                rows.append(("floor P", "pyzmq, pipelined sends (no ack wait)",
                             measure("floor P", lambda n, d: run_floor_pipelined(floor, n, d),
                                     args.n, args.repeat, budget)))

    floor_rate = next((r["rate"] for k, _, r in rows if k == "floor A"), None)
    print()
    header = f"{'variant':<8} {'':<38} {'tasks/s':>8}  {'submit phase/s':>14}  {'vs floor A':>10}  runs (tasks/s)"
    print(header)
    print("-" * len(header))
    for key, label, r in rows:
        frac = f"{r['rate'] / floor_rate:>10.2f}" if floor_rate and not key.startswith("floor") else f"{'':>10}"
        runs = ", ".join(f"{x:.0f}" for x in r["rates"])
        print(f"{key:<8} {label:<38} {r['rate']:>8.0f}  {r['submit_rate']:>14.0f}  {frac}  {runs}")
    print()
    print("tasks/s = n / (first submit -> last result received); submit phase/s = n / (time until the "
          "last submit returned).")
    print(f"total wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:  # a scenario ran past its deadline; everything was stopped
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        sys.exit(2)
