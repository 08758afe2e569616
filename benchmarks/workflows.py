"""Workflows against the same work done by hand: a 1,000-member chord and a 1,000-step chain.

    PYTHONPATH=. /work/venv/bin/python benchmarks/workflows.py [--n 1000] [--repeat 3]
                                                           [--workers 2] [--store sqlite|temp]

Scenarios (one runtime on a fresh state directory; each timed from submit to the final value,
median of ``--repeat``):

  chord        ``chord([add1.s(i) for i in range(n)], total.s())``
  map          the same work by hand: ``add1.map(range(n))``, ``wait_all``, then
               ``total.submit(results).result()`` (two round trips through the app)
  chain        ``chain(add1.s(0), add1.s(), ... n steps)``: each step starts when the one
               before it ends, released by the supervisor in the commit of that outcome
  sequential   the same chain by hand: ``x = add1.submit(x).result()`` n times
  map (floor)  ``add1.map(range(n))`` and ``wait_all``: the same number of tasks, no order at all
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from _common import postgres, print_machine, run_script, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402

app = cpsl.App("bench-workflows", grace=1.0, max_queued=1_000_000)


@app.task
def add1(x: int) -> int:
    return x + 1


@app.task
def total(xs: list[int]) -> int:
    return sum(xs)


def timed(run: Callable[[], object], expected: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - t0)
        assert value == expected, (value, expected)
    return statistics.median(times)


def scenarios(n: int) -> list[tuple[str, Callable[[], object], object]]:
    def chord() -> object:
        return cpsl.chord([add1.s(i) for i in range(n)], total.s()).submit().result(timeout=300)

    def by_map() -> object:
        values = cpsl.wait_all(add1.map(range(n)), timeout=300)
        return total.submit(values).result(timeout=300)

    def chain() -> object:
        return cpsl.chain(add1.s(0), *[add1.s() for _ in range(n - 1)]).submit().result(timeout=300)

    def sequential() -> object:
        x = 0
        for _ in range(n):
            x = add1.submit(x).result(timeout=60)
        return x

    def floor() -> object:
        return len(cpsl.wait_all(add1.map(range(n)), timeout=300))

    chord_sum = sum(i + 1 for i in range(n))
    return [
        ("chord of n members + callback", chord, chord_sum),
        ("map() + wait_all + callback submit", by_map, chord_sum),
        ("chain of n steps", chain, n),
        ("n sequential submit().result()", sequential, n),
        ("map() + wait_all (no order: floor)", floor, n),
    ]


def run(args: argparse.Namespace, store: str | None) -> None:
    with temp_dir() as state_dir, app.start(state_dir=state_dir, workers=args.workers, store=store):
        print(f"n={args.n}, workers={args.workers}, median of {args.repeat}, store={'PostgreSQL' if store else 'SQLite'}")
        print(f"{'scenario':<40} {'wall s':>8} {'tasks/s':>9}")
        for name, fn, expected in scenarios(args.n):
            fn()  # warm-up (imports, the first submit of each name waits for its ack)
            seconds = timed(fn, expected, args.repeat)
            print(f"{name:<40} {seconds:8.3f} {args.n / seconds:9.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", choices=("sqlite", "temp"), default="sqlite")
    args = parser.parse_args()
    print_machine()
    if args.store == "temp":
        with postgres("temp") as (url, _):
            run(args, url)
    else:
        run(args, None)
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
