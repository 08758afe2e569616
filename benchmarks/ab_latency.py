"""Round-trip latency of two checkouts side by side, their round trips interleaved one by one.

    /work/venv/bin/python benchmarks/ab_latency.py OLD_CHECKOUT NEW_CHECKOUT [--n 2000] [--process]
                                                   [--store-a URL|temp] [--store-b URL|temp]

For changes worth a few percent of a round trip: this machine's speed drifts by more than that
between two runs a minute apart, so comparing two runs of ``latency.py`` mostly measures the
drift. Here each checkout gets its own runtime in its own client process (``PYTHONPATH`` = the
checkout), and the two take turns: one ``submit(i).result()`` of A, one of B, one of B, one of A,
… so both see the same moments of the machine. Prints p50 / p90 / p99 of each and the median of
the paired differences (B - A, per pair of neighbouring round trips). The same checkout twice
shows the method's own noise (here ±15 µs on the paired median, 2,000 pairs).

``--process`` measures a ``process=True`` no-op instead of an ``async`` one. A checkout is a
directory holding ``capsule_actors/`` (``git worktree add /tmp/old HEAD~1`` makes one).
``--store-a`` / ``--store-b`` put a side on PostgreSQL (``temp``: one server of this run's own,
fsync on, shared by both sides as two apps); the same checkout twice with ``--store-b temp``
measures what PostgreSQL adds to a round trip over SQLite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import percentile, postgres, print_machine, stop_pid, temp_dir  # noqa: E402

READY, GO, DONE = b"r", b"g", b"d"
WARMUP = 300


def _child(checkout: str, state_dir: str, n: int, process: bool, store: str, side: str) -> None:
    """One side: its own runtime; a round trip each time the parent says go."""
    sys.path.insert(0, checkout)
    import capsule_actors as cpsl

    if not cpsl.__file__ or not cpsl.__file__.startswith(checkout):
        raise SystemExit(f"capsule_actors was imported from {cpsl.__file__}, not from {checkout}")
    app = cpsl.App(f"ab-latency-{side}", grace=2.0)  # two apps may share one PostgreSQL database

    @app.task
    async def noop(x: int) -> int:
        return x

    @app.task(process=True)
    def pnoop(x: int) -> int:
        return x

    task = pnoop if process else noop
    with app.start(state_dir=state_dir, store=store or None):
        for i in range(WARMUP):
            task.submit(i).result(timeout=10)
        samples = []
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
        stdout.write(READY)
        stdout.flush()
        for i in range(n):
            if stdin.read(1) != GO:
                raise SystemExit("the parent went away")
            t0 = time.perf_counter()
            if task.submit(i).result(timeout=10) != i:
                raise SystemExit(f"{task.name}({i}) returned a wrong value")
            samples.append(time.perf_counter() - t0)
            stdout.write(DONE)
            stdout.flush()
        sys.stderr.write(json.dumps(samples) + "\n")


def _read(proc: subprocess.Popen[bytes], expected: bytes) -> None:
    assert proc.stdout is not None
    got = proc.stdout.read(1)
    if got != expected:
        raise RuntimeError(f"a side ended early (exit code {proc.wait(10)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="checkout A (the baseline)")
    parser.add_argument("b", help="checkout B (the change)")
    parser.add_argument("--n", type=int, default=2000, help="round trips of each (default 2000)")
    parser.add_argument("--process", action="store_true", help="a process=True no-op instead of an async one")
    for side in "ab":
        parser.add_argument(f"--store-{side}", metavar="URL", default="",
                            help=f"checkout {side.upper()}'s store: a postgresql:// URL, or temp for a server of this "
                                 "run's own (both sides share it); default SQLite in its state dir")
    args = parser.parse_args()
    checkouts = [str(Path(p).resolve()) for p in (args.a, args.b)]
    for path in checkouts:
        if not (Path(path) / "capsule_actors" / "__init__.py").exists():
            parser.error(f"{path!r} holds no capsule_actors/ package")
    print_machine()
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(temp_dir("cpsl-ab-"))
        stores = [getattr(args, f"store_{side}") for side in "ab"]
        if "temp" in stores:
            temp_url, note = stack.enter_context(postgres("temp"))
            print(note)
            stores = [temp_url if s == "temp" else s for s in stores]
        try:
            for side, path, store in zip("ab", checkouts, stores):
                env = dict(os.environ, PYTHONPATH=path)
                cmd = [sys.executable, __file__, "_child", path, str(tmp / side), str(args.n), str(int(args.process)),
                       store, side]
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, env=env))
            for proc in procs:
                _read(proc, READY)
            for i in range(args.n):
                for proc in procs if i % 2 == 0 else procs[::-1]:  # neither always goes first
                    assert proc.stdin is not None
                    proc.stdin.write(GO)
                    proc.stdin.flush()
                    _read(proc, DONE)
            results = []
            for proc in procs:
                _, err = proc.communicate(timeout=60)
                results.append(json.loads(err.decode().strip().splitlines()[-1]))
        finally:
            for proc in procs:
                stop_pid(proc)
    a, b = results
    print(f"\n{args.n} round trips each, interleaved ({'process=True' if args.process else 'async'} no-op), ms")
    for side, path, samples in (("A", checkouts[0], a), ("B", checkouts[1], b)):
        p50, p90, p99 = (percentile([s * 1000 for s in samples], pct) for pct in (50, 90, 99))
        store = "PostgreSQL" if getattr(args, f"store_{side.lower()}") else "SQLite"
        print(f"  {side} p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f}  {path} ({store})")
    paired = statistics.median(y - x for x, y in zip(a, b)) * 1e6
    print(f"  B - A, median of the paired differences: {paired:+.1f} us")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6], sys.argv[7])
    else:
        main()
