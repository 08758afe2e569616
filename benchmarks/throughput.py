"""Throughput of a no-op task through capsule_actors, next to the raw-pyzmq floor.

    /work/venv/bin/python benchmarks/throughput.py [--n 2000] [--repeat 3] [--workers 2]
                                                   [--process-workers N] [--no-floor]
                                                   [--compare celery,dramatiq,rq,huey] [--store URL|temp]

Variants (each one: N tasks of a no-op that returns its argument; the clock runs from the first
submit until the last result is in the caller's hands; every result is checked):

  A  submit() loop      N sequential ``noop.submit(i)`` (each returns once durable: journaled),
                        then ``h.result()`` of every handle in order.
  B  map()              ``noop.map(range(N))``: one durable batch, then every ``h.result()``.
  C  asubmit() gather   ``asyncio.gather`` of N ``noop.asubmit(i)``, then ``gather`` of the handles.
  D  process=True map() the same as B for a ``process=True`` no-op (process-isolated actors).
  floor A               raw pyzmq: a Python ROUTER process + 2 worker processes over ipc://, the
                        same shape as A (N acked sends back to back, then every result).
  floor pipelined       the floor without waiting for each ack (N sends, then every result).

Prints tasks/s (median of --repeat runs) for each, and A-D as a fraction of floor A.

``--compare celery,dramatiq,rq,huey`` runs scenario A on each of those peers that is installed, in
the same run (``benchmarks/peers.py``: a throwaway ``redis-server`` on 127.0.0.1 and the peer's
workers, stopped by pid at the end): N submits back to back with the peer's normal submit call,
then every result awaited in order with its normal blocking wait. Their rows show
``ours A / this``: A's tasks/s divided by the peer's (above 1: capsule_actors is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common, when this file is imported rather than run
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

import peers  # noqa: E402
from _common import Deadline, Floor, Watchdog, median, postgres, print_machine, run_script, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402

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


def run_peer_loop(peer: peers.Peer, n: int, deadline: Deadline) -> Run:
    """Scenario A on a peer: its submit call N times in a loop, then every result in order."""
    t0 = time.perf_counter()
    handles = []
    for i in range(n):
        handles.append(peer.submit(i))
        if i % 64 == 0:
            deadline.left()
    t1 = time.perf_counter()
    results = [peer.result(h, deadline.left()) for h in handles]
    t2 = time.perf_counter()
    _check(results, n, f"{peer.name}: submit loop")
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


def peer_budget(n: int) -> float:
    """Seconds allowed per run of a peer: RQ forks a process per job (~100 tasks/s here)."""
    return 30.0 + n / 20.0


def run_ours(n: int, repeat: int, workers: int, process_workers: int, budget: float, tmp: Path,
             floor: bool = True, dog: Watchdog | None = None, store: str | None = None
             ) -> list[tuple[str, str, dict[str, Any]]]:
    """Variants A-D on a fresh runtime (on ``store``: a PostgreSQL URL, else SQLite), then
    (``floor``) floor A and floor P; one row each."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    runtime = app.start(state_dir=tmp / "s", workers=workers, process_workers=process_workers, store=store)
    if dog is not None:
        dog.on_expire(runtime.stop)
    with runtime:
        warm_up(Deadline(60.0, "warm-up"), process_workers)
        for key, label, fn in VARIANTS:
            rows.append((key, label, measure(label, fn, n, repeat, budget)))
    if floor:
        with Floor(tmp, n_workers=2) as fl:
            warm = Deadline(30.0, "floor warm-up")
            run_floor_acked(fl, 100, warm)
            run_floor_pipelined(fl, 100, warm)
            rows.append(("floor A", "pyzmq ROUTER + 2 workers, acked sends",
                         measure("floor A", lambda n, d: run_floor_acked(fl, n, d), n, repeat, budget)))
            rows.append(("floor P", "pyzmq, pipelined sends (no ack wait)",
                         measure("floor P", lambda n, d: run_floor_pipelined(fl, n, d), n, repeat, budget)))
    return rows


def measure_peer(peer: peers.Peer, n: int, repeat: int, budget: float | None = None) -> dict[str, Any]:
    """Scenario A on a running peer, ``repeat`` times; the same dict as ``measure``."""
    return measure(f"{peer.name}: scenario A", lambda n, d: run_peer_loop(peer, n, d), n, repeat,
                   budget or peer_budget(n))


def run_peers(names: list[str], n: int, repeat: int, tmp: Path, dog: Watchdog | None = None,
              budget: float | None = None) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """Scenario A on each installed peer in ``names``; returns (rows, one-line notes on skipped ones)."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    notes: list[str] = []
    for name in names:
        why = peers.unavailable(name)
        if why:
            notes.append(f"{name}: skipped ({why})")
            continue
        print(f"{peers.describe(name)}: starting", file=sys.stderr, flush=True)
        submit, wait = peers.CALLS[name]
        try:
            with peers.running(name, tmp, dog=dog) as peer:
                rows.append((peer.label, f"{submit} loop, then each {wait}", measure_peer(peer, n, repeat, budget)))
        except Exception as exc:  # one peer failing (or over its deadline) does not lose the others
            peers.check_expired(dog)  # the hard limit's cleanups caused it: exit 2
            notes.append(f"{name}: failed ({type(exc).__name__}: {str(exc)[:300]})")
    return rows, notes


def print_table(rows: list[tuple[str, str, dict[str, Any]]], ours_key: str = "A") -> None:
    floor_rate = next((r["rate"] for k, _, r in rows if k == "floor A"), None)
    ours_rate = next((r["rate"] for k, _, r in rows if k == ours_key), None)
    is_peer = [not (k.startswith("floor") or any(k == v[0] for v in VARIANTS)) for k, _, _ in rows]
    width = max(8, *(len(k) for k, _, _ in rows))
    lw = max(38, *(len(label) for _, label, _ in rows))
    ratio_col = any(is_peer) and ours_rate is not None
    header = (f"{'variant':<{width}} {'':<{lw}} {'tasks/s':>8}  {'submit phase/s':>14}  {'vs floor A':>10}  "
              + (f"{'ours A / this':>13}  " if ratio_col else "") + "runs (tasks/s)")
    print(header)
    print("-" * len(header))
    for (key, label, r), peer in zip(rows, is_peer):
        frac = f"{r['rate'] / floor_rate:>10.2f}" if floor_rate and not key.startswith("floor") else f"{'':>10}"
        ratio = ""
        if ratio_col:
            ratio = f"{ours_rate / r['rate']:>13.2f}  " if peer and ours_rate else f"{'':>13}  "
        runs = ", ".join(f"{x:.0f}" for x in r["rates"])
        print(f"{key:<{width}} {label:<{lw}} {r['rate']:>8.0f}  {r['submit_rate']:>14.0f}  {frac}  {ratio}{runs}")


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
                        help="seconds allowed per run of one variant (default 30 + n/100; peers 30 + n/20)")
    parser.add_argument("--compare", default="", metavar="LIST",
                        help="comma-separated peers to run scenario A on too: celery,dramatiq,rq,huey")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="run capsule_actors on this PostgreSQL store (postgresql://...), or on a server of its "
                             "own with --store temp; default SQLite in the state directory")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1 or args.workers < 1:
        parser.error("--n, --repeat and --workers must be >= 1")
    process_workers = args.process_workers or args.workers
    budget = args.deadline or 30.0 + args.n / 100.0
    names = peers.parse_list(args.compare)
    p_budget = args.deadline or peer_budget(args.n)

    print(f"capsule_actors {cpsl.__version__} throughput: no-op task, n={args.n}, "
          f"median of {args.repeat}, workers={args.workers}, process_workers={process_workers}")
    print_machine()
    started = time.monotonic()
    # A hard limit on the whole run, for what has no timeout of its own (stopping peer workers).
    hard = (len(VARIANTS) + 2) * args.repeat * budget + 120.0 + len(names) * (args.repeat * p_budget + 150.0)
    with peers.HardLimit(hard, "throughput.py") as dog, temp_dir() as tmp, contextlib.ExitStack() as stack:
        dog.on_expire(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
        store = None
        if args.store:
            store, note = stack.enter_context(postgres(args.store))
            print(note)
        rows = run_ours(args.n, args.repeat, args.workers, process_workers, budget, tmp, floor=args.floor, dog=dog,
                        store=store)
        peer_rows, notes = run_peers(names, args.n, args.repeat, tmp, dog, p_budget)
        rows += peer_rows

    print()
    print_table(rows)
    print()
    print("tasks/s = n / (first submit -> last result received); submit phase/s = n / (time until the "
          "last submit returned).")
    if peer_rows:
        print("ours A / this = capsule_actors A's tasks/s / the peer's (above 1: capsule_actors is faster).")
        for name in names:
            if peers.unavailable(name) is None:
                print(f"  {peers.describe(name)}")
    for note in notes:
        print(note)
    print(f"total wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
