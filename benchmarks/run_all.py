"""Every throughput and latency scenario in one run, and one table.

    /work/venv/bin/python benchmarks/run_all.py [--compare celery,dramatiq,rq,huey] [--with-crash]
                                                [--metrics] [--otel]
                                                [--n 2000] [--repeat 3] [--rt 300] [--warmup 50]

Scenarios (no-op task returning its argument; 2 worker actors and 2 process actors by default):

  A  ``--n`` tasks submitted back to back with the system's normal submit call, then every result
     awaited in order (``throughput.py``; median tasks/s of ``--repeat`` runs).
  B  ``--rt`` sequential submit -> result round trips after ``--warmup`` more (``latency.py``;
     p50 / p99 / max in ms).

Rows: capsule_actors' variants (``submit()`` loop; ``map()`` with per-handle ``result()`` and with
``wait_all()``; ``asubmit()`` + ``gather``; ``process=True``), the raw-pyzmq floor (acked and
pipelined), and with ``--compare`` each installed peer (``peers.py``: a throwaway redis-server and
the peer's workers, stopped by pid; one start per peer for both scenarios). Peer rows show
``ours / this``: capsule_actors' A tasks/s divided by the peer's (above 1: ours is faster) and
ours B p50 divided by the peer's (below 1: ours is faster).

``--with-crash`` also runs ``crash_recovery.py`` with small settings (``--crash-kills`` SIGKILLs,
and with ``--compare`` a few kills of Celery and Dramatiq) as a subprocess, and adds the p50 of
"killed task's result" (ms from the SIGKILL of a process running a task until that task's result
arrived, retried) with the number of killed tasks that came back.

``--metrics`` and ``--otel`` run capsule_actors' rows again with ``/metrics`` served (and scraped
every second) or with an OpenTelemetry SDK recording a span per attempt (``observability.py``),
and say what share of the plain rows' A tasks/s each keeps.

The default run (no peers) takes about 30-60 s; with all four peers about 3-5 min. A watchdog
stops every process and exits 2 if the whole run overshoots ``--hard-limit``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

import latency  # noqa: E402
import observability  # noqa: E402
import peers  # noqa: E402
import throughput  # noqa: E402
from _common import (  # noqa: E402
    Watchdog,
    postgres,
    print_machine,
    print_package,
    run_script,
    stats_ms,
    stop_tree,
    temp_dir,
)

import capsule_actors as cpsl  # noqa: E402

CRASH_PEERS = ("celery", "dramatiq")  # the peers crash_recovery.py knows


class Row:
    def __init__(self, system: str, a: dict[str, Any] | None = None, b: list[float] | None = None,
                 peer: bool = False) -> None:
        self.system, self.a, self.b, self.peer = system, a, b, peer
        self.crash: str = ""
        self.note: str = ""


# ---- crash_recovery.py as a subprocess ---------------------------------------------------------------

_CRASH_ROW = re.compile(
    r"^(?P<system>\S.*?)\s+(?P<kills>\d+)\s{2,}(?P<new>\S.*?)\s{2,}(?P<ready>\S.*?)\s{2,}(?P<first>\S.*?)"
    r"\s{2,}(?P<result>\S.*?)\s{2,}(?P<ok>\d+)/(?P<timeout>\d+)/(?P<err>\d+)\s+(?P<tasks>\d+)\s+(?P<lost>\d+)"
    r"\s+(?P<extra>\d+)\s*$")


def parse_crash(text: str) -> dict[str, dict[str, str]]:
    """crash_recovery.py's table: system -> its columns (strings as printed)."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = _CRASH_ROW.match(line)
        if m and not line.startswith("system"):
            out[m["system"].strip()] = m.groupdict()
    return out


def run_crash(args: argparse.Namespace, peer_names: list[str], dog: Watchdog
              ) -> tuple[dict[str, dict[str, str]], str]:
    """Run crash_recovery.py with small settings; (parsed rows, a note when it failed)."""
    cmd = [sys.executable, str(HERE / "crash_recovery.py"), "--kills", str(args.crash_kills), "--budget", "90"]
    compare = [p for p in peer_names if p in CRASH_PEERS and peers.unavailable(p) is None]
    if compare:
        cmd += ["--compare", ",".join(compare), "--peer-kills", str(args.crash_peer_kills),
                "--peer-timeout", "15", "--peer-give-up", "1", "--peer-drain", "10", "--peer-budget", "90"]
    limit = 150.0 + 150.0 * len(compare)
    print(f"crash_recovery.py: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True)
    dog.on_expire(lambda: stop_tree(proc, grace=1.0))
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        return {}, f"crash_recovery.py ran over {limit:g} s and was stopped"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            stop_tree(proc, grace=5.0)
    rows = parse_crash(out)
    note = ""
    if not rows:
        note = f"crash_recovery.py exited with {proc.returncode} and printed no table: {out.strip()[-400:]}"
    elif proc.returncode not in (0, None):
        note = f"crash_recovery.py exited with {proc.returncode} (a capsule_actors check failed: lost or extra runs)"
    return rows, note


def crash_cell(row: dict[str, str]) -> str:
    """``"88 (20/20)"``: the p50 of the killed task's result, and killed tasks back / kills."""
    p50 = row["result"].split(" / ")[0] if row["result"] != "-" else "-"
    lost = f", {row['lost']} lost" if row["lost"] != "0" else ""
    return f"{p50} ({row['ok']}/{row['kills']}{lost})"


# ---- the measurements ----------------------------------------------------------------------------


def measure_ours(args: argparse.Namespace, tmp: Path, dog: Watchdog, store: str | None = None,
                 floor: bool = True, tag: str = "") -> list[Row]:
    """capsule_actors' A variants (throughput.py) and B (latency.py), each on a fresh runtime on
    ``store`` (a PostgreSQL URL; None: SQLite); ``tag`` names a variant (say, " [metrics]")."""
    where = tag or ("" if store is None else " [PostgreSQL]")
    tmp = tmp / ("sqlite" if store is None else "postgresql") / (re.sub(r"\W+", "-", tag).strip("-") or "plain")
    (tmp / "a").mkdir(parents=True)
    (tmp / "b").mkdir()
    floor = floor and args.floor
    print(f"capsule_actors{where}: scenario A variants", file=sys.stderr, flush=True)
    a = {k: r for k, _, r in throughput.run_ours(args.n, args.repeat, args.workers, args.workers,
                                                  a_budget(args), tmp / "a", floor=floor, dog=dog, store=store)}
    print(f"capsule_actors{where}: scenario B", file=sys.stderr, flush=True)
    b = dict(latency.run_ours(args.rt, args.warmup, args.workers, b_budget(args), tmp / "b", floor=floor,
                              dog=dog, store=store))
    rows = [
        Row(f"capsule_actors{where} submit() loop | submit().result()", a["A"], b["submit -> result"]),
        Row(f"capsule_actors{where} map(), then each result()", a["B"]),
        Row(f"capsule_actors{where} map(), wait_all()", a["B2"]),
        Row(f"capsule_actors{where} asubmit() x N, gather", a["C"]),
        Row(f"capsule_actors{where} process=True map(), wait_all() | submit().result()", a["D"],
            b["process=True submit -> result"]),
    ]
    if floor:
        rows += [Row("floor: pyzmq, acked sends | send -> ack -> result", a["floor A"],
                     b["floor: pyzmq send -> ack -> result"]),
                 Row("floor: pyzmq, pipelined sends", a["floor P"])]
    return rows


def measure_observed(args: argparse.Namespace, tmp: Path, dog: Watchdog, plain: list[Row]
                     ) -> tuple[list[Row], list[str]]:
    """``--metrics`` / ``--otel``: our rows again with each switched on (tracing last: its SDK
    stays set up in this process), and each A rate as a share of the plain row's."""
    rows, notes = [], []
    for metrics, otel in ((True, False), (False, True)):
        if not (metrics and args.metrics or otel and args.otel):
            continue
        with observability.observed([throughput.app, latency.app], metrics=metrics, otel=otel) as tag:
            print(f"capsule_actors{tag}: scenarios A and B", file=sys.stderr, flush=True)
            observed = measure_ours(args, tmp, dog, floor=False, tag=tag)
        rows += observed
        shares = [f"{row.system.split(tag, 1)[1].strip()}: {row.a['rate'] / base.a['rate']:.1%}"
                  for base, row in zip(plain, observed) if row.a and base.a]
        notes.append(f"A tasks/s with{tag.replace('[', '').replace(']', '')} on, as a share of the same row "
                     f"without: " + "; ".join(shares))
    return rows, notes


def measure_peers(names: list[str], args: argparse.Namespace, tmp: Path, dog: Watchdog
                  ) -> tuple[list[Row], list[str]]:
    """A and B on each installed peer, one start of its workers for both; (rows, notes)."""
    rows: list[Row] = []
    notes: list[str] = []
    for name in names:
        why = peers.unavailable(name)
        if why:
            notes.append(f"{name}: skipped ({why})")
            continue
        print(f"{peers.describe(name)}: starting", file=sys.stderr, flush=True)
        submit, wait = peers.CALLS[name]
        row = Row(f"{peers.label(name)} {submit} loop | {submit}.{wait}", peer=True)
        try:
            with peers.running(name, tmp, dog=dog) as peer:
                row.a = throughput.measure_peer(peer, args.n, args.repeat)
                row.b = [s[0] for s in latency.measure_peer(peer, args.rt, args.warmup, b_budget(args))]
        except Exception as exc:  # one peer failing (or over its deadline) does not lose the others
            peers.check_expired(dog)  # the hard limit's cleanups caused it: exit 2
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        notes.append(peers.describe(name))
    return rows, notes


def add_crash(rows: list[Row], args: argparse.Namespace, names: list[str], dog: Watchdog) -> list[str]:
    """Run crash_recovery.py and fill the crash column; returns notes."""
    crash, note = run_crash(args, names, dog)
    notes = [note] if note else []
    for r in rows:
        if r.system.startswith("capsule_actors process=True") and "capsule_actors" in crash:
            r.crash = crash_cell(crash["capsule_actors"])
        elif r.peer:
            key = next((k for k in crash if k.split()[0] == r.system.split()[0]), None)
            r.crash = crash_cell(crash[key]) if key else ""
    skipped = [p for p in names if p not in CRASH_PEERS]
    if skipped:
        notes.append(f"crash recovery: not measured for {', '.join(skipped)} (crash_recovery.py knows "
                     f"{', '.join(CRASH_PEERS)})")
    return notes


def a_budget(args: argparse.Namespace) -> float:
    return 30.0 + args.n / 100.0


def b_budget(args: argparse.Namespace) -> float:
    return 30.0 + 0.05 * (args.rt + args.warmup)


# ---- the table ---------------------------------------------------------------------------------------


def print_table(rows: list[Row], with_crash: bool) -> None:
    ours_a = next((r.a["rate"] for r in rows if r.system.startswith("capsule_actors submit()") and r.a), None)
    ours_b = next((stats_ms(r.b)[0] for r in rows if r.system.startswith("capsule_actors submit()") and r.b), None)
    width = max(len(r.system) for r in rows)
    header = (f"{'system':<{width}}  {'A tasks/s':>9}  {'A ours/this':>11}  {'B p50 ms':>8}  {'B p99 ms':>8}  "
              f"{'B max ms':>8}  {'B p50 ours/this':>15}" + (f"  {'crash: killed task result p50 ms':>32}"
                                                              if with_crash else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        a = f"{r.a['rate']:>9.0f}" if r.a else f"{'-':>9}"
        a_ratio = f"{ours_a / r.a['rate']:>11.2f}" if r.peer and r.a and ours_a else f"{'':>11}"
        if r.b:
            p50, p99, mx = stats_ms(r.b)
            b = f"{p50:>8.2f}  {p99:>8.2f}  {mx:>8.2f}"
            b_ratio = f"{ours_b / p50:>15.2f}" if r.peer and ours_b else f"{'':>15}"
        else:
            b, b_ratio = f"{'-':>8}  {'-':>8}  {'-':>8}", f"{'':>15}"
        crash = f"  {r.crash:>32}" if with_crash else ""
        print(f"{r.system:<{width}}  {a}  {a_ratio}  {b}  {b_ratio}{crash}".rstrip()
              + (f"   [{r.note}]" if r.note else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="scenario A: tasks per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="scenario A: runs per row, median shown (default 3)")
    parser.add_argument("--rt", type=int, default=300, help="scenario B: measured round trips (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="scenario B: round trips before measuring (50)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker actors and process actors (default: CPU count)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the raw-pyzmq floor too (default: on)")
    parser.add_argument("--compare", default="", metavar="LIST",
                        help="comma-separated peers: celery,dramatiq,rq,huey (those installed run)")
    parser.add_argument("--with-crash", action="store_true",
                        help="also run crash_recovery.py with small settings and add its p50")
    parser.add_argument("--crash-kills", type=int, default=20, help="capsule_actors SIGKILLs for --with-crash (20)")
    parser.add_argument("--crash-peer-kills", type=int, default=3, help="SIGKILLs per peer for --with-crash (3)")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="also run capsule_actors' rows on this PostgreSQL store (postgresql://...), or on a "
                             "server of its own with --store temp (Debian's postgresql, fsync on)")
    parser.add_argument("--metrics", action="store_true",
                        help="also run capsule_actors' rows with /metrics served and scraped every second")
    parser.add_argument("--otel", action="store_true",
                        help="also run capsule_actors' rows with an OpenTelemetry SDK recording every attempt's span")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds for the whole run (default 240 + 150 per peer, + 150 (+150 per crash "
                             "peer) with --with-crash)")
    args = parser.parse_args(argv)
    if min(args.n, args.repeat, args.rt, args.workers, args.crash_kills, args.crash_peer_kills) < 1:
        parser.error("--n, --repeat, --rt, --workers and the kill counts must be >= 1")
    names = peers.parse_list(args.compare)
    crash_peers = [p for p in names if p in CRASH_PEERS]
    hard = args.hard_limit or (240.0 + (240.0 if args.store else 0.0) + 150.0 * len(names)
                               + ((150.0 + 150.0 * len(crash_peers)) if args.with_crash else 0.0)
                               + 200.0 * (args.metrics + args.otel))

    print(f"capsule_actors {cpsl.__version__}: A = {args.n} submits back to back, then every result "
          f"(median of {args.repeat}); B = {args.rt} sequential round trips after {args.warmup}; "
          f"workers={args.workers}, process_workers={args.workers}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%a %b %d %H:%M:%S UTC %Y}")
    print_package(Path(cpsl.__file__).parent)
    print_machine()
    started = time.monotonic()
    notes: list[str] = []
    with peers.HardLimit(hard, "run_all.py") as dog, temp_dir() as tmp:
        dog.on_expire(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
        rows = measure_ours(args, tmp, dog)
        if args.metrics or args.otel:
            observed_rows, observed_notes = measure_observed(args, tmp, dog, rows)
            rows += observed_rows
            notes += observed_notes
        if args.store:
            with postgres(args.store) as (url, note):
                rows += measure_ours(args, tmp, dog, store=url, floor=False)
                notes.append(note)
        peer_rows, peer_notes = measure_peers(names, args, tmp, dog)
        rows += peer_rows
        notes += peer_notes
        if args.with_crash:
            notes += add_crash(rows, args, names, dog)

    print()
    print_table(rows, args.with_crash)
    print()
    print("A tasks/s: n / (first submit -> last result in hand). B: one task in flight, submit -> result, in ms.")
    print("A ours/this: capsule_actors submit() loop tasks/s / this row's (above 1: ours is faster); "
          "B p50 ours/this: our submit().result() p50 / this row's (below 1: ours is faster).")
    if args.with_crash:
        print(f"crash: crash_recovery.py --kills {args.crash_kills} (peers: --peer-kills {args.crash_peer_kills}, "
              "--peer-timeout 15): ms from the SIGKILL of a process running a task until that task's result "
              "arrived (p50), then (killed tasks that came back / kills).")
    for note in notes:
        print(note)
    print(f"total wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
