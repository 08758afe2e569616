"""Round-trip latency of a no-op task through capsule_actors, next to the raw-pyzmq floor.

    /work/venv/bin/python benchmarks/latency.py [--n 300] [--warmup 50] [--workers 2] [--no-floor]
                                                [--compare celery,dramatiq,rq,huey]

After a warm-up, N sequential round trips, one task in flight at a time:

  submit -> result        ``noop.submit(i).result()``: the durable submit (one request to the
                          supervisor, answered after the SQLite commit), then the wait for the
                          result (a second request, answered when the actor reports it).
    of which the ack      the ``submit()`` call alone (until the handle is returned).
  process=True            the same for a ``process=True`` no-op (process-isolated actors).
  floor                   raw pyzmq: one acked send to a Python ROUTER process that forwards to
                          2 worker processes over ipc://, then the pushed result.

Prints p50, p99 and max in milliseconds for each.

``--compare celery,dramatiq,rq,huey`` runs the same N sequential round trips (after the same
warm-up) on each of those peers that is installed, in the same run (``benchmarks/peers.py``: a
throwaway ``redis-server`` on 127.0.0.1 and the peer's workers, stopped by pid at the end): the
peer's normal submit call, then its normal blocking wait for the result. Their rows show
``ours / this``: capsule_actors' submit -> result p50 and p99 divided by the peer's (below 1:
capsule_actors is faster).
"""

from __future__ import annotations

import argparse
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
from _common import Deadline, Floor, Watchdog, percentile, print_machine, run_script, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402

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


def _peer_round_trip(peer: peers.Peer, i: int, deadline: Deadline) -> Sample:
    t0 = time.perf_counter()
    h = peer.submit(i)
    t1 = time.perf_counter()
    value = peer.result(h, deadline.left())
    t2 = time.perf_counter()
    if value != i:
        raise AssertionError(f"{peer.name}: noop({i}) returned {value!r}")
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


def run_ours(n: int, warmup: int, workers: int, budget: float, tmp: Path,
             floor: bool = True, dog: Watchdog | None = None, store: str | None = None
             ) -> list[tuple[str, list[float]]]:
    """capsule_actors' round trips on a fresh runtime (worker and process actors; on ``store``, a
    PostgreSQL URL, else SQLite), then the floor's."""
    rows: list[tuple[str, list[float]]] = []
    runtime = app.start(state_dir=tmp / "s", workers=workers, process_workers=workers, store=store)
    if dog is not None:
        dog.on_expire(runtime.stop)
    with runtime:
        samples = sample("submit -> result", lambda i, d: _round_trip(noop, i, d), n, warmup, budget)
        rows.append(("submit -> result", [s[0] for s in samples]))
        rows.append(("  of which submit() ack", [s[1] for s in samples]))
        samples = sample("process=True", lambda i, d: _round_trip(pnoop, i, d), n, warmup, budget)
        rows.append(("process=True submit -> result", [s[0] for s in samples]))
    if floor:
        with Floor(tmp, n_workers=2) as fl:
            samples = sample("floor", lambda i, d: _floor_round_trip(fl, i, d), n, warmup, budget)
            rows.append(("floor: pyzmq send -> ack -> result", [s[0] for s in samples]))
            rows.append(("  of which the ack", [s[1] for s in samples]))
    return rows


def measure_peer(peer: peers.Peer, n: int, warmup: int, budget: float) -> list[Sample]:
    """N sequential round trips on a running peer after ``warmup`` more."""
    return sample(f"{peer.name}: round trips", lambda i, d: _peer_round_trip(peer, i, d), n, warmup, budget)


def run_peers(names: list[str], n: int, warmup: int, budget: float, tmp: Path, dog: Watchdog | None = None
              ) -> tuple[list[tuple[str, list[float]]], list[str]]:
    """Round trips on each installed peer in ``names``: (rows, one-line notes on skipped ones)."""
    rows: list[tuple[str, list[float]]] = []
    notes: list[str] = []
    for name in names:
        why = peers.unavailable(name)
        if why:
            notes.append(f"{name}: skipped ({why})")
            continue
        print(f"{peers.describe(name)}: starting", file=sys.stderr, flush=True)
        try:
            with peers.running(name, tmp, dog=dog) as peer:
                samples = measure_peer(peer, n, warmup, budget)
        except Exception as exc:  # one peer failing (or over its deadline) does not lose the others
            peers.check_expired(dog)  # the hard limit's cleanups caused it: exit 2
            notes.append(f"{name}: failed ({type(exc).__name__}: {str(exc)[:300]})")
            continue
        submit, wait = peers.CALLS[name]
        rows.append((f"{peer.label}: {submit}.{wait}", [s[0] for s in samples]))
        rows.append(("  of which the submit call", [s[1] for s in samples]))
    return rows, notes


def print_table(rows: list[tuple[str, list[float]]], peer_rows: frozenset[str] = frozenset()) -> None:
    """``peer_rows``: the labels of the peers' rows, which get the ``ours / this`` column."""
    floor_p50 = next((stats(v)[0] for k, v in rows if k.startswith("floor")), None)
    ours = next((stats(v) for k, v in rows if k == "submit -> result"), None)
    width = max(36, *(len(k) for k, _ in rows))
    header = (f"{'scenario':<{width}} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  {'p50 vs floor':>12}"
              + (f"  {'ours / this p50, p99':>20}" if peer_rows and ours else ""))
    print(header)
    print("-" * len(header))
    for label, values in rows:
        p50, p99, mx = stats(values)
        ratio = "" if floor_p50 is None or label.startswith(("floor", "  ")) else f"{p50 / floor_p50:.1f}x"
        line = f"{label:<{width}} {p50:>8.3f} {p99:>8.3f} {mx:>8.3f}  {ratio:>12}"
        if label in peer_rows and ours:
            line += f"  {ours[0] / p50:>10.2f}, {ours[1] / p99:.2f}"
        print(line)


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
    parser.add_argument("--compare", default="", metavar="LIST",
                        help="comma-separated peers to run the same round trips on: celery,dramatiq,rq,huey")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--n and --workers must be >= 1, --warmup >= 0")
    budget = args.deadline or 30.0 + 0.05 * (args.n + args.warmup)
    names = peers.parse_list(args.compare)

    print(f"capsule_actors {cpsl.__version__} latency: no-op task, {args.n} sequential round trips "
          f"after {args.warmup} warm-up, workers={args.workers}, process_workers={args.workers}")
    print_machine()
    started = time.monotonic()
    hard = 3 * budget + 120.0 + len(names) * (budget + 150.0)  # for what has no timeout of its own
    with peers.HardLimit(hard, "latency.py") as dog, temp_dir() as tmp:
        dog.on_expire(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
        rows = run_ours(args.n, args.warmup, args.workers, budget, tmp, floor=args.floor, dog=dog)
        peer_rows, notes = run_peers(names, args.n, args.warmup, budget, tmp, dog)
        rows += peer_rows

    print()
    print_table(rows, frozenset(label for label, _ in peer_rows if not label.startswith("  ")))
    print()
    if peer_rows:
        print("ours / this = capsule_actors' submit -> result p50 (p99) / the peer's (below 1: capsule_actors "
              "is faster).")
        for name in names:
            if peers.unavailable(name) is None:
                print(f"  {peers.describe(name)}")
    for note in notes:
        print(note)
    print(f"total wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
