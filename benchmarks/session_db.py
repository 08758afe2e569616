"""session.db writes in a task while the supervisor is busy: the latency of each write.

    python benchmarks/session_db.py [--tasks 10] [--writes 50]

A `def` task bound to a session writes ``session.db[key] = i`` ``--writes`` times and times each
write; ``--tasks`` of them run one after another while another thread of this process keeps a
`submit()` → `result()` loop going, so the supervisor's write transactions are frequent. In the
supervisor's machine a task writes capsule.db itself and waits for SQLite's write lock whenever
the supervisor holds it. Prints p50 / p99 / max of the writes in ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import print_machine, stats_ms

import capsule_actors as cpsl

app = cpsl.App("session-db-bench", workers=2, process_workers=1)


@app.task
def writer(n: int, session: cpsl.Session) -> list[float]:
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        session.db[f"k{i % 5}"] = i
        took.append(time.perf_counter() - t0)
    return took


@app.task
async def noop(x: int) -> int:
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--writes", type=int, default=50)
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory(prefix="cpsl-bench-") as d, app.start(state_dir=Path(d) / "s"):
        session = cpsl.Session("bench")
        writer.submit(1, session=session).result(30)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                noop.submit(1).result(30)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        took: list[float] = []
        try:
            for _ in range(args.tasks):
                took += writer.submit(args.writes, session=session).result(120)
        finally:
            stop.set()
            loader.join(30)
    p50, p99, worst = stats_ms(took)
    print(f"session.db write in a task, {len(took)} writes under a submit loop: "
          f"p50 {p50:.2f} ms  p99 {p99:.2f} ms  max {worst:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
