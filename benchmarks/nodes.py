"""Worker nodes on this machine: the cost of the TCP + CURVE path with 0, 1, 2 and 3 nodes.

    /work/venv/bin/python benchmarks/nodes.py [--n 2000] [--rt 300] [--repeat 3] [--max-nodes 3]

One supervisor (`capsule-actors run --bind tcp://127.0.0.1:PORT`, 1 worker actor, 1 process actor)
and k worker nodes (`capsule-actors worker`, 1 worker actor each), all on this machine's 2 cores,
so this shows the overhead of the TCP path, not a speedup. For each k:

  map()      N no-op tasks in one durable batch, then every result (wait_all): tasks/s, median
             of --repeat runs, and the share that ran on node actors.
  RT local   --rt sequential submit -> result round trips of a *locked* no-op whose key this
             host's worker owns (admission and run over ipc://): p50 / p99.
  RT node    the same with keys owned by node actors (admission and run over TCP + CURVE).

A locked task runs on its key's owner, which is how the round trips are pinned to one path; the
owner is the rendezvous hash of router.py over the pool's slots (w0, n1:w0, n2:w0, ...).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from _common import (  # noqa: E402
    Deadline,
    Watchdog,
    free_port,
    median,
    percentile,
    print_machine,
    stop_tree,
    temp_dir,
)

MODULE = '''
import os
import capsule_actors as cpsl

app = cpsl.App("bench-nodes", workers=1, process_workers=1, grace=2.0)

@app.task
async def noop(x):
    return x

@app.task
async def node_of(x):
    return os.environ.get("CAPSULE_NODE")

@app.task(lock="rt:{key}")
async def locked_noop(key):
    return key
'''


def _cli(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(HERE.parent)]), CAPSULE_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "capsule_actors", *args], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _status(mod: Any) -> dict[str, Any]:
    from capsule_actors import messages

    body, _ = mod.app.client().call(lambda req: messages.Status(req), timeout=10)
    return dict(body)


def _wait_ready(mod: Any, nodes: int, deadline: Deadline) -> None:
    while True:
        try:
            status = _status(mod)
            if len(status["nodes"]) == nodes and all(a["state"] == "ready" for a in status["actors"]):
                return
        except Exception:
            pass
        deadline.left()
        time.sleep(0.1)


def _keys_owned(slots: list[str], local: bool, count: int) -> list[str]:
    """``count`` keys owned by this host's worker (``local``) or else by node actors."""
    from capsule_actors.supervisor.router import owner

    keys, i = [], 0
    while len(keys) < count:
        key = f"k{i}"
        i += 1
        if (owner(f"rt:{key}", slots) == "w0") == local:
            keys.append(key)
    return keys


def _round_trips(mod: Any, keys: list[str], deadline: Deadline) -> tuple[float, float]:
    times = []
    for key in keys:
        t0 = time.perf_counter()
        assert mod.locked_noop.submit(key).result(timeout=deadline.left()) == key
        times.append(time.perf_counter() - t0)
    times = times[len(times) // 10:]  # the first tenth warms up
    return percentile(times, 50) * 1000, percentile(times, 99) * 1000


def measure(tmp: Path, k: int, args: argparse.Namespace, dog: Watchdog) -> dict[str, Any]:
    import capsule_actors as cpsl

    state = tmp / f"state{k}"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    sup = _cli(tmp, "run", "bench_nodes_mod:app", "--bind", address, "--keys", str(tmp / "keys"),
               "--state-dir", str(state))
    procs = [sup]
    dog.on_expire(lambda: [stop_tree(p, 1.0) for p in procs])
    os.environ["CAPSULE_STATE_DIR"] = str(state)
    sys.modules.pop("bench_nodes_mod", None)
    import bench_nodes_mod as mod

    try:
        for i in range(1, k + 1):
            procs.append(_cli(tmp, "worker", "bench_nodes_mod:app", "--connect", address, "--key",
                              str(tmp / "keys" / f"n{i}.key_secret"), "--name", f"n{i}", "--workers", "1",
                              "--process-workers", "0"))
        _wait_ready(mod, k, Deadline(60, "nodes joining"))
        slots = ["w0"] + [f"n{i}:w0" for i in range(1, k + 1)]
        runs, shares = [], []
        for _ in range(args.repeat):
            deadline = Deadline(60 + args.n * 0.01, "map()")
            t0 = time.perf_counter()
            handles = mod.noop.map(range(args.n))
            results = cpsl.wait_all(handles, timeout=deadline.left())
            runs.append(args.n / (time.perf_counter() - t0))
            assert results == list(range(args.n))
            where = cpsl.wait_all(mod.node_of.map(range(200)), timeout=deadline.left())
            shares.append(sum(w is not None for w in where) / len(where))
        local = _round_trips(mod, _keys_owned(slots, True, args.rt), Deadline(60 + args.rt * 0.05, "RT local"))
        remote = _round_trips(mod, _keys_owned(slots, False, args.rt), Deadline(60 + args.rt * 0.05, "RT node")
                              ) if k else None
        return {"nodes": k, "map": median(runs), "share": median(shares), "local": local, "remote": remote}
    finally:
        from capsule_actors.client import Client

        Client.close_all()
        for proc in reversed(procs):
            stop_tree(proc, 5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="tasks per map() run (default 2000)")
    parser.add_argument("--rt", type=int, default=300, help="round trips per path (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="map() runs per node count (default 3)")
    parser.add_argument("--max-nodes", type=int, default=3, help="up to this many nodes (default 3)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.rt < 10 or args.repeat < 1 or not 0 <= args.max_nodes <= 9:
        parser.error("--n >= 1, --rt >= 10, --repeat >= 1, 0 <= --max-nodes <= 9")
    import capsule_actors as cpsl

    print(f"capsule_actors {cpsl.__version__} worker nodes over TCP + CURVE on one machine: "
          f"supervisor with 1 worker, k nodes with 1 worker each")
    print_machine()
    rows = []
    with Watchdog(600 + args.max_nodes * 300, "nodes.py") as dog, temp_dir() as tmp:
        (tmp / "bench_nodes_mod.py").write_text(MODULE)
        sys.path.insert(0, str(tmp))
        subprocess.run([sys.executable, "-m", "capsule_actors", "keys", str(tmp / "keys")], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        for i in range(1, args.max_nodes + 1):
            subprocess.run([sys.executable, "-m", "capsule_actors", "keys", str(tmp / "keys"), "--add", f"n{i}"],
                           check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        for k in range(args.max_nodes + 1):
            row = measure(tmp, k, args, dog)
            rows.append(row)
            print(f"  {k} nodes: done", flush=True)
    print()
    print(f"{'nodes':>5}  {'map() tasks/s':>13}  {'on nodes':>8}  {'RT local p50/p99 ms':>20}  "
          f"{'RT node p50/p99 ms':>19}")
    for row in rows:
        remote = f"{row['remote'][0]:.2f} / {row['remote'][1]:.2f}" if row["remote"] else "-"
        print(f"{row['nodes']:>5}  {row['map']:>13,.0f}  {row['share']:>8.0%}  "
              f"{row['local'][0]:>9.2f} / {row['local'][1]:<8.2f}  {remote:>19}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
