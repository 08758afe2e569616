"""Throughput of two checkouts side by side, their batches interleaved: is B within x % of A?

    /work/venv/bin/python benchmarks/ab_throughput.py OLD_CHECKOUT NEW_CHECKOUT [--n 1500]
                                                      [--rounds 3] [--sessions 16]
                                                      [--variants A,B2,D] [--metrics-b]

For "the no-op table must not drop by more than 5 %": on this machine two runs of the same
checkout a minute apart differ by up to 10 % (a shared virtual machine: its speed drifts, and each
process draws its own memory layout), so two ``throughput.py`` runs cannot show 5 %. Here each
checkout runs its own runtime in its own driver process (``PYTHONPATH`` = the checkout, the same
``PYTHONHASHSEED``), and the two take turns batch by batch (A B, then B A, …) so both see the same
moments of the machine; every ``--sessions`` the drivers are started afresh (which one starts
first alternates), so no one process's luck decides. Variants are throughput.py's: A the
``submit()`` loop then every ``result()``, B2 ``map()`` + ``wait_all()``, D the same for a
``process=True`` no-op, C ``asubmit()`` + gather. ``--metrics-b``: B serves ``/metrics``, scraped
every second (give the same checkout twice to measure what metrics cost).

Prints, per variant, B's throughput as a fraction of A's (sum over all batches) with a bootstrap
95 % interval, and the CPU each side's supervisor spent per task. The same checkout twice shows
the method's own noise (here ±3 % on the fraction with the defaults, ~4 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import print_machine  # noqa: E402


def _child(checkout: str, metrics: bool) -> None:
    """One side: a runtime of ``checkout`` (``metrics``: serving /metrics, scraped each second);
    a batch of a variant for each line read on stdin."""
    sys.path.insert(0, checkout)
    import contextlib

    import psutil
    import throughput as tp
    from _common import Deadline

    if not tp.cpsl.__file__ or not tp.cpsl.__file__.startswith(checkout):
        raise SystemExit(f"capsule_actors was imported from {tp.cpsl.__file__}, not from {checkout}")
    variants = {"A": tp.run_submit_loop, "B2": tp.run_map_bulk, "C": tp.run_asubmit, "D": tp.run_process_map}
    if metrics:
        import observability

        observed: Any = observability.observed([tp.app], metrics=True)
    else:
        observed = contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="ab-tp-", dir="/tmp") as tmp, observed:
        runtime = tp.app.start(state_dir=Path(tmp) / "s", workers=2, process_workers=2)
        with runtime:
            tp.warm_up(Deadline(60.0, "warm-up"), 2)
            supervisor = psutil.Process(runtime.pid)

            def cpu() -> float:
                times = supervisor.cpu_times()
                return float(times.user + times.system)

            print("ready", flush=True)
            for line in sys.stdin:
                name, n = line.split()
                before = cpu()
                seconds, _ = variants[name](int(n), Deadline(120.0, name))
                print(json.dumps({"seconds": seconds, "supervisor_cpu": cpu() - before}), flush=True)


class _Side:
    def __init__(self, checkout: str, metrics: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{HERE}", "PYTHONHASHSEED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", checkout, *(["--metrics"] if metrics else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise SystemExit(f"the driver of {checkout} did not start (exit {self.proc.wait(60)})")

    def batch(self, variant: str, n: int) -> dict[str, float]:
        self.stdin.write(f"{variant} {n}\n")
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise SystemExit(f"a driver died during a batch of {variant}")
        result: dict[str, float] = json.loads(line)
        return result

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _interval(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float]:
    """Bootstrap 95 % interval of sum(a) / sum(b) over the paired batches."""
    rng = random.Random(1)
    ratios = []
    for _ in range(draws):
        picks = [rng.randrange(len(a)) for _ in a]
        ratios.append(sum(a[i] for i in picks) / sum(b[i] for i in picks))
    ratios.sort()
    return ratios[int(draws * 0.025)], ratios[int(draws * 0.975)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="checkout A (a directory holding capsule_actors/)")
    parser.add_argument("new", help="checkout B")
    parser.add_argument("--n", type=int, default=1500, help="tasks per batch")
    parser.add_argument("--rounds", type=int, default=3, help="batches of each variant per side and session")
    parser.add_argument("--sessions", type=int, default=16, help="fresh pairs of runtimes")
    parser.add_argument("--variants", default="A,B2,D")
    parser.add_argument("--metrics-b", action="store_true",
                        help="B serves /metrics, scraped every second (A and B may be the same checkout)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    old, new = str(Path(args.old).resolve()), str(Path(args.new).resolve())
    b_tag = " (with /metrics)" if args.metrics_b else ""
    print(f"ab_throughput: A={old}  B={new}{b_tag}  n={args.n} rounds={args.rounds} sessions={args.sessions}")
    print_machine()
    got: dict[str, dict[str, list[dict[str, float]]]] = {v: {"a": [], "b": []} for v in variants}
    for session in range(args.sessions):
        metrics = {"a": False, "b": args.metrics_b}
        order = ("a", "b") if session % 2 == 0 else ("b", "a")
        sides = {key: _Side(old if key == "a" else new, metrics[key]) for key in order}
        try:
            for r in range(args.rounds):
                for variant in variants:
                    for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
                        got[variant][key].append(sides[key].batch(variant, args.n))
        finally:
            for side in sides.values():
                side.close()
    print()
    print(f"{'variant':8} {'A tasks/s':>10} {'B tasks/s':>10} {'B / A':>7} {'95 % interval':>16}"
          f" {'A sup us/task':>14} {'B sup us/task':>14}")
    for variant in variants:
        a = [r["seconds"] for r in got[variant]["a"]]
        b = [r["seconds"] for r in got[variant]["b"]]
        low, high = _interval(a, b)
        cpu_a = sum(r["supervisor_cpu"] for r in got[variant]["a"]) / (len(a) * args.n) * 1e6
        cpu_b = sum(r["supervisor_cpu"] for r in got[variant]["b"]) / (len(b) * args.n) * 1e6
        print(
            f"{variant:8} {len(a) * args.n / sum(a):>10,.0f} {len(b) * args.n / sum(b):>10,.0f}"
            f" {sum(a) / sum(b):>7.3f} {f'[{low:.3f}, {high:.3f}]':>16} {cpu_a:>14.1f} {cpu_b:>14.1f}"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        _child(sys.argv[2], "--metrics" in sys.argv[3:])
    else:
        sys.exit(main())

