"""Priority inversion: how long one high-priority task waits behind a low-priority flood, and
what the flow-control checks cost the dispatch path.

    /work/venv/bin/python benchmarks/priority.py [--flood 20000] [--probes 30] [--workers 2]
                                                 [--store sqlite|temp] [--no-micro]

Scenario (a runtime of its own on a fresh state directory):

  flood        ``--flood`` low-priority tasks (priority 0, each ``asyncio.sleep(0.05)``) submitted
               with ``map()``, so the queue is deep (past QUEUE_WINDOW the rest waits in the store)
  probe        while the flood drains, one ``probe.options(priority=10)`` every 50 ms
               (``--probes`` of them), and as a control one probe of priority 0 at the start
  queue wait   each probe's ``started_at - created_at`` (both stamped by the supervisor)

Prints the high-priority probes' queue wait p50 / p99 / max in ms, the control's wait (what the
probe would wait without a priority: the flood ahead of it) and how much of the flood was left.

``--micro`` (default on) also times the dispatch path's pieces in this process, per task:
``TaskTable``'s ready queue as a plain deque (before priorities) and as the ``ReadyQueue`` that
replaced it (priority 0 only, and 4 priorities mixed), and the set lookup that lets a task
without limits skip ``Limits.admit``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from _common import Deadline, percentile, postgres, print_machine, run_script, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402
from capsule_actors.supervisor.tasks import ReadyQueue  # noqa: E402

app = cpsl.App("bench-priority", grace=1.0, max_queued=1_000_000)


@app.task
async def flood(i: int) -> int:
    await asyncio.sleep(0.05)
    return i


@app.task
async def probe(i: int) -> int:
    return i


def _wait(h: cpsl.TaskHandle, deadline: Deadline) -> float:
    h.result(timeout=deadline.left())
    info = h.info()
    assert info.started_at is not None
    return info.started_at - info.created_at


def inversion(args: argparse.Namespace, store: str | None) -> None:
    deadline = Deadline(args.deadline, "priority inversion")
    with temp_dir() as state, app.start(state_dir=state / "state", workers=args.workers, store=store) as rt:
        flood.map(list(range(args.flood)))
        control = probe.submit(-1)  # priority 0: behind the whole flood
        highs = []
        for i in range(args.probes):
            highs.append(probe.options(priority=10).submit(i))
            time.sleep(0.05)
        waits = [_wait(h, deadline) for h in highs]
        left = rt.status()["tasks"].get("QUEUED", 0)
        control_wait = _wait(control, deadline)
        p50, p99 = percentile(waits, 50) * 1000, percentile(waits, 99) * 1000
        print(f"priority 10 probe, queue wait: p50 {p50:.1f} ms  p99 {p99:.1f} ms  max {max(waits) * 1000:.1f} ms")
        print(f"  (flood of {args.flood} at priority 0; {left} of it still queued after the last probe started)")
        print(f"priority 0 probe (control), queue wait: {control_wait * 1000:.0f} ms")


def micro(n: int = 200_000) -> None:
    """Per-task cost of the ready queue's append + peek + popleft, and of the gated check."""
    ids = [f"{i:032x}" for i in range(n)]

    def plain() -> None:
        q: collections.deque[str] = collections.deque()
        for t in ids:
            q.append(t)
        while q:
            q[0]
            q.popleft()

    def ready(priorities: int) -> None:
        q = ReadyQueue()
        for i, t in enumerate(ids):
            q.append(t, i % priorities)
        while q.peek() is not None:
            q.popleft()

    gated = frozenset({"limited"})
    cases = [
        ("deque (before priorities)", plain),
        ("ReadyQueue, priority 0 only", lambda: ready(1)),
        ("ReadyQueue, 4 priorities", lambda: ready(4)),
        ("'name not in gated' check", lambda: [t in gated for t in ids]),
    ]
    print(f"dispatch path, per task (best of 5 x {n:,}):")
    for label, fn in cases:
        best = min(timeit.repeat(fn, number=1, repeat=5))
        print(f"  {label:<30} {best / n * 1e9:7.0f} ns")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", choices=("sqlite", "temp"), default="sqlite")
    parser.add_argument("--no-micro", dest="micro", action="store_false")
    parser.add_argument("--deadline", type=float, default=300.0)
    args = parser.parse_args()
    print_machine()
    if args.store == "temp":
        with postgres("temp") as (url, _):
            inversion(args, url)
    else:
        inversion(args, None)
    if args.micro:
        micro()
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
