"""Lock-key deduplication under concurrent submits from several client processes.

    /work/venv/bin/python benchmarks/dedup.py [--clients 4] [--per-client 2500] [--keys 100]
                                              [--order random|rr] [--policy join|queue]
                                              [--sleep-ms 20:50] [--workers 2]

``--clients`` processes (default 4) each submit ``--per-client`` tasks (default 2,500, so 10,000
in all) of one ``async def`` task with ``lock="k:{key}"``, over ``--keys`` lock keys (default
100), all at the same time. Each client picks its keys at random with a fixed seed (``--seed`` +
client number) or round-robin (``--order rr``). The body sleeps 20-50 ms (so that submits of a
key arrive while it runs and join it), and then appends one line to a per-run file: the key, the
client and submit number that started it, its start and end times (CLOCK_MONOTONIC, which all
processes share) and its pid. The file is the ground truth of how many times the body ran.

Prints: submits/s (all submits over the wall time of the submit phase, first submit of any
client to the last one returned), submit() latency, how many times the body ran, how many
handles were deduplicated, and the checks:

  * every handle's result() is the value of a run of its own key;
  * body runs + deduplicated handles == submits, and the runs are exactly the non-deduplicated
    handles (each ran once);
  * no key ran twice at once (per key, every run ends before the next one starts);
  * no submit joined a task that had already finished before the submit was sent (``join``
    must only return a *live* task: queued, scheduled or running).

With ``--policy queue`` the task uses ``on_conflict="queue"``: nothing is deduplicated, every
submit runs, one at a time per key; the same checks apply. ``--baseline`` (on by default) also
times the same submit load on a task without a lock, to show what admission by the key's owner
actor costs.

Every client is a subprocess (this file, with ``--client``), stopped by pid in ``finally``; every
wait has a deadline and the whole run a hard limit (``--deadline``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common, when this file is imported rather than run
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

from _common import Deadline, Watchdog, die_with_parent, percentile, print_machine, print_package, stop_tree, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402

app = cpsl.App("bench-dedup", grace=2.0)

RUNS_ENV = "CPSL_BENCH_RUNS_FILE"


def _sleep_s(client: int, i: int, lo_ms: int, hi_ms: int) -> float:
    """The body's sleep for submit ``i`` of ``client``: fixed per submit, spread over [lo, hi] ms."""
    span = hi_ms - lo_ms + 1
    return (lo_ms + (client * 7919 + i * 104729) % span) / 1000.0


async def _body(key: str, client: int, i: int, sleep_s: float) -> list[Any]:
    import asyncio

    start = time.monotonic()
    await asyncio.sleep(sleep_s)
    end = time.monotonic()
    line = json.dumps([key, client, i, start, end, os.getpid()]) + "\n"
    fd = os.open(os.environ[RUNS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one O_APPEND write per run: lines never interleave
    finally:
        os.close(fd)
    return [key, client, i]


@app.task(lock="k:{key}", on_conflict="join")
async def djoin(key: str, client: int, i: int, sleep_s: float) -> list[Any]:
    """Deduplicated by key: a submit while the key's task is live joins it."""
    return await _body(key, client, i, sleep_s)


@app.task(lock="k:{key}", on_conflict="queue")
async def dqueue(key: str, client: int, i: int, sleep_s: float) -> list[Any]:
    """One at a time per key: a submit while the key's task is live waits behind it."""
    return await _body(key, client, i, sleep_s)


@app.task
async def unlocked(key: str, client: int, i: int, sleep_s: float) -> list[Any]:
    """The baseline: the same submits without a lock (the body does not sleep or write)."""
    return [key, client, i]


TASKS = {"join": djoin, "queue": dqueue, "unlocked": unlocked}


# ---- the client process ------------------------------------------------------------------------


def client_main(args: argparse.Namespace) -> int:
    """One client: warm up, say ready, wait for "go" on stdin, submit, collect, report as JSON."""
    die_with_parent()
    deadline = Deadline(args.client_deadline, f"client {args.client}")
    task = TASKS[args.task]
    rng = random.Random(args.seed + args.client)
    keys = [f"{(rng.randrange(args.keys) if args.order == 'random' else (i + args.client) % args.keys):03d}"
            for i in range(args.per_client)]
    unlocked.submit("warm", args.client, -1, 0.0).result(timeout=deadline.left())  # connect + warm
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    lat: list[float] = []
    sent_at: list[float] = []  # wall clock, to compare with the holders' finished_at
    handles = []
    t0 = time.monotonic()
    for i, key in enumerate(keys):
        sent_at.append(time.time())
        s = time.perf_counter()
        handles.append(task.submit(key, args.client, i, _sleep_s(args.client, i, args.lo_ms, args.hi_ms)))
        lat.append(time.perf_counter() - s)
        if i % 64 == 0:
            deadline.left()
    t1 = time.monotonic()
    results = [h.result(timeout=deadline.left()) for h in handles]
    t2 = time.monotonic()
    wrong = [i for i, (key, r) in enumerate(zip(keys, results, strict=True)) if r[0] != key]
    own_wrong = [i for i, (h, r) in enumerate(zip(handles, results, strict=True))
                 if not h.deduplicated and r != [keys[i], args.client, i]]
    # A join must return a live task: look up when each joined holder finished.
    stale = 0
    if args.task != "unlocked":
        finished: dict[str, float | None] = {}
        for h in handles:
            if h.deduplicated and h.id not in finished:
                finished[h.id] = h.info().finished_at
                deadline.left()
        stale = sum(1 for h, at in zip(handles, sent_at, strict=True)
                    if h.deduplicated and (finished[h.id] or float("inf")) < at)
    report = {
        "client": args.client, "t0": t0, "t1": t1, "t2": t2, "lat": lat,
        "dedup": sum(1 for h in handles if h.deduplicated),
        "own": [[keys[i], args.client, i] for i, h in enumerate(handles) if not h.deduplicated],
        "wrong_key": len(wrong), "wrong_own": len(own_wrong), "stale_joins": stale,
        "distinct_ids": len({h.id for h in handles}),
    }
    Path(args.out).write_text(json.dumps(report))
    return 0


# ---- the driver --------------------------------------------------------------------------------


def run_phase(task_name: str, args: argparse.Namespace, tmp: Path, state_dir: Path,
              deadline: Deadline) -> list[dict[str, Any]]:
    """Start the clients, let them go at once, wait for their reports; always stop them."""
    procs: list[subprocess.Popen[str]] = []
    outs = [tmp / f"{task_name}-client{c}.json" for c in range(args.clients)]
    env = dict(os.environ, CAPSULE_STATE_DIR=str(state_dir), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        for c in range(args.clients):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--client", str(c), "--task", task_name,
                   "--out", str(outs[c]), "--per-client", str(args.per_client), "--keys", str(args.keys),
                   "--order", args.order, "--seed", str(args.seed), "--sleep-ms", f"{args.lo_ms}:{args.hi_ms}",
                   "--client-deadline", str(max(1.0, deadline.left()))]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for c, proc in enumerate(procs):  # each says "ready" once connected and warm
            line = _readline(proc, deadline)
            if line != "ready":
                raise RuntimeError(f"client {c} said {line!r} instead of ready (exit {proc.poll()})")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for c, proc in enumerate(procs):
            proc.wait(max(0.1, deadline.left()))
            if proc.returncode != 0:
                raise RuntimeError(f"client {c} exited with {proc.returncode}")
        return [json.loads(p.read_text()) for p in outs]
    finally:
        for proc in procs:
            stop_tree(proc, grace=1.0)


def _readline(proc: subprocess.Popen[str], deadline: Deadline) -> str:
    import select

    assert proc.stdout is not None
    while not select.select([proc.stdout], [], [], min(0.5, deadline.left()))[0]:
        if proc.poll() is not None:
            return f"<exited {proc.returncode}>"
    return proc.stdout.readline().strip()


def check_runs(runs_file: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [json.loads(line) for line in runs_file.read_text().splitlines() if line]
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, _, _, start, end, _ in runs:
        by_key[key].append((start, end))
    overlaps, worst = 0, 0.0
    for spans in by_key.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                overlaps += 1
                worst = max(worst, end - start)
    ran = Counter((key, client, i) for key, client, i, *_ in runs)
    own = Counter(tuple(o) for r in reports for o in r["own"])
    return {
        "runs": len(runs), "overlaps": overlaps, "worst_overlap_ms": worst * 1000,
        "ran_twice": sum(1 for n in ran.values() if n > 1),
        "ran_not_own": sum(1 for k in ran if k not in own),
        "own_not_ran": sum(1 for k in own if k not in ran),
        "keys_used": len(by_key),
    }


def summarize(label: str, reports: list[dict[str, Any]], total: int) -> dict[str, Any]:
    wall = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    done = max(r["t2"] for r in reports) - min(r["t0"] for r in reports)
    lat = [x * 1000 for r in reports for x in r["lat"]]
    return {
        "label": label, "submits_per_s": total / wall, "wall": wall, "until_results": done,
        "lat_p50": percentile(lat, 50), "lat_p99": percentile(lat, 99), "lat_max": max(lat),
        "dedup": sum(r["dedup"] for r in reports), "wrong_key": sum(r["wrong_key"] for r in reports),
        "wrong_own": sum(r["wrong_own"] for r in reports), "stale": sum(r["stale_joins"] for r in reports),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--per-client", type=int, default=2500, help="submits per client (default 2500)")
    parser.add_argument("--keys", type=int, default=100, help="distinct lock keys (default 100)")
    parser.add_argument("--order", choices=("random", "rr"), default="random",
                        help="keys at random with a fixed seed, or round-robin (default random)")
    parser.add_argument("--seed", type=int, default=1, help="seed of client c is seed + c (default 1)")
    parser.add_argument("--policy", choices=("join", "queue"), default="join",
                        help="on_conflict of the locked task (default join)")
    parser.add_argument("--sleep-ms", default="20:50", help="the body's sleep range in ms (default 20:50)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker actors (default: CPU count)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the same submits of a task without a lock (default: on)")
    parser.add_argument("--deadline", type=float, default=170.0, help="hard limit on the whole run (default 170 s)")
    # the client side (this file run by itself as a client process)
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--client-deadline", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.lo_ms, args.hi_ms = (int(x) for x in args.sleep_ms.split(":"))
    except ValueError:
        parser.error("--sleep-ms takes LO:HI in milliseconds, e.g. 20:50")
    if args.client is not None:
        return client_main(args)
    if min(args.clients, args.per_client, args.keys, args.workers) < 1 or not 0 <= args.lo_ms <= args.hi_ms:
        parser.error("--clients, --per-client, --keys, --workers must be >= 1 and 0 <= LO <= HI")

    total = args.clients * args.per_client
    print(f"capsule_actors {cpsl.__version__} dedup: {total} submits = {args.clients} client processes x "
          f"{args.per_client}, {args.keys} keys ({args.order}), on_conflict={args.policy!r}, body sleeps "
          f"{args.lo_ms}-{args.hi_ms} ms, workers={args.workers}")
    print_package(Path(cpsl.__file__).parent)
    print_machine()
    started = time.monotonic()
    with Watchdog(args.deadline, "dedup.py") as dog, temp_dir() as tmp:
        deadline = Deadline(args.deadline - 5.0, "dedup.py")
        state_dir = tmp / "s"
        runs_file = tmp / "runs.jsonl"
        os.environ[RUNS_ENV] = str(runs_file)  # the actors inherit it through the supervisor
        runtime = app.start(state_dir=state_dir, workers=args.workers, process_workers=1)
        dog.on_expire(runtime.stop)
        with runtime:
            phases = []
            if args.baseline:
                phases.append(summarize("no lock (baseline)", run_phase("unlocked", args, tmp, state_dir,
                                                                        deadline), total))
            reports = run_phase(args.policy, args, tmp, state_dir, deadline)
            phases.append(summarize(f"lock, on_conflict={args.policy}", reports, total))
            counts = runtime.status().get("tasks", {})
        check = check_runs(runs_file, reports)

    locked = phases[-1]
    print()
    header = f"{'scenario':<26} {'submits/s':>9} {'submit phase s':>14} {'until results s':>15} " \
             f"{'submit() p50 ms':>15} {'p99 ms':>7} {'max ms':>7}"
    print(header)
    print("-" * len(header))
    for p in phases:
        print(f"{p['label']:<26} {p['submits_per_s']:>9.0f} {p['wall']:>14.2f} {p['until_results']:>15.2f} "
              f"{p['lat_p50']:>15.3f} {p['lat_p99']:>7.3f} {p['lat_max']:>7.1f}")
    print()
    dedup, runs = locked["dedup"], check["runs"]
    print(f"submits {total}: body ran {runs} times, {dedup} handles deduplicated "
          f"({dedup / total:.1%}); runs + deduplicated = {runs + dedup}; keys that ran {check['keys_used']}")
    print(f"store after the run: {dict(sorted(counts.items()))}")
    checks = [
        ("runs + deduplicated handles == submits", runs + dedup == total),
        ("every non-deduplicated handle ran exactly once, and nothing else ran",
         check["ran_twice"] == 0 and check["ran_not_own"] == 0 and check["own_not_ran"] == 0),
        ("every result() is a run of the handle's own key", locked["wrong_key"] == 0),
        ("every non-deduplicated result() is its own run", locked["wrong_own"] == 0),
        (f"no key ran twice at once ({check['overlaps']} overlapping pairs, "
         f"worst {check['worst_overlap_ms']:.1f} ms)", check["overlaps"] == 0),
        (f"no submit joined a task that had already finished ({locked['stale']} did)", locked["stale"] == 0),
    ]
    for what, ok in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    print(f"\ntotal wall time {time.monotonic() - started:.1f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:  # a phase ran past its deadline; everything was stopped
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        sys.exit(2)
