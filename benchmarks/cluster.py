"""A cluster of members on one PostgreSQL schema: throughput with 1, 2 and 3 members, and failover.

    /work/venv/bin/python benchmarks/cluster.py [--n 2000] [--rt 200] [--kills 20] [--lease 2]
                                                [--store URL] [--json PATH]

Every member is a real ``capsule-actors run cluster_bench_app:app --name mK --store URL --lease L
--workers W --process-workers P`` process with a state directory of its own, started here in
its own session (process group) and stopped by pid. PostgreSQL is a server of this run's own
(``tests/postgres_server.py``: initdb + pg_ctl, fsync on, a Unix socket) unless ``--store URL``
names one; every scenario gets a fresh schema (``?schema=``; on a ``--store`` server they are
dropped at the end).

Throughput, for N = 1, 2, 3 members (``--members``), each ``--workers 1 --process-workers 1``, and
for N = 0: one supervisor on the same store without ``--name`` (no cluster), what a member costs:

  unlocked    ``--n`` no-op ``submit()`` calls in a loop from this process through member m1's
              state directory, then every result (``wait_all``): tasks/s = n / (first submit ->
              last result), median of ``--repeat``; "submit/s" = n / the submit loop alone.
              m1 keeps a window of queued unlocked work; the rest goes to the store's pool, which
              every member claims from. "ran on" counts where the tasks ran (the task returns
              its member's name).
  locked      the same with a locked no-op over ``--keys`` keys (``on_conflict="queue"``: every
              submit runs): each key's shard is held by one member, which admits and runs it; a
              submit through m1 of a key another member holds waits for that member's admission.
  RT          ``--rt`` sequential submit -> result round trips through m1 (after 20 warm-up):
              p50 / p99 ms, for each variant (locked: keys round-robin, so most on other members).

All members share this machine's CPUs (``os.cpu_count()`` is printed): with more members than
cores the numbers show what coordination through the store costs, not scale-out.

Failover, with 2 members and ``--lease`` (default 2 s; the runtime's default is 6 s), ``--kills``
times: a long locked task ``hold`` (fresh key each round, retried at once) is submitted through
m1; the member that runs it (its body writes its member's name and start time to a file) is the
victim. Once the body runs, the victim's process group is SIGKILLed (and any descendant of it
outside the group), and the time until the task's next attempt *starts on the survivor* (the
file again) is the failover time. The task is then told to end (a stop file) and its result is
read through the survivor; the victim is started again (a new incarnation on the same state
directory) and the round ends once both members are live and hold at least 16 of the 64 shards
each. Expected: about one lease after the kill (the victim's row expires a lease after its last
renewal, which was up to a quarter lease before the kill; the survivor looks every quarter lease).

At the end, every member log is searched for ``ERROR`` and ``Traceback`` lines; they are printed
(and written to ``--json``). Every wait has a deadline; a watchdog stops everything and exits 2
if the whole run overruns ``--hard-limit``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    Deadline,
    Watchdog,
    machine_info,
    median,
    percentile,
    print_machine,
    print_package,
    run_script,
    temp_dir,
)

import capsule_actors as cpsl  # noqa: E402

APP = "cluster_bench_app:app"
SHARDS = 64
RT_WARMUP = 20


# ---- URLs and the server -------------------------------------------------------------------------
def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


@contextlib.contextmanager
def postgres(store: str | None, fsync: bool, schemas: list[str], dog: Watchdog) -> Iterator[tuple[str, str]]:
    """(base URL, note): ``store``, or a server of this run's own (stopped by the watchdog too).
    On a ``store`` server the schemas named in ``schemas`` by then are dropped at the end."""
    if store is not None:
        try:
            yield store, f"PostgreSQL: {store}"
        finally:
            drop_schemas(store, schemas)
        return
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from postgres_server import PostgresServer

    with PostgresServer(fsync=fsync) as server:
        dog.on_expire(server.stop)
        server.create_database("bench")
        version = subprocess.run([str(server.bin / "postgres"), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        yield server.url("bench"), (f"PostgreSQL: a server of this run's own ({version}, fsync "
                                    f"{'on' if fsync else 'off'}, Unix socket, pid {server.pid})")


def drop_schemas(store: str, schemas: list[str]) -> None:
    if not schemas:
        return
    import psycopg

    from capsule_actors.store.postgres import split_url

    libpq, _ = split_url(store, "x")
    try:
        with psycopg.connect(libpq, autocommit=True, connect_timeout=10) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except Exception as exc:  # the numbers are in; say what is left behind
        print(f"note: could not drop schemas {schemas} on {store}: {exc}", file=sys.stderr)


# ---- members -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Member:
    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_file: TextIO
    app: cpsl.App  # the members' App bound to this member's state directory (this process submits)

    @property
    def pid(self) -> int:
        return self.proc.pid


def descendants(pid: int) -> list[tuple[int, float]]:
    import psutil

    out = []
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out.append((p.pid, p.create_time()))
    return out


def kill_pids(pids: list[tuple[int, float]]) -> int:
    """SIGKILL each (pid, create_time) still alive as that same process; how many were."""
    import psutil

    killed = 0
    for pid, created in pids:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed += 1
    return killed


class Cluster:
    """Members on one store URL (one schema), in ``root``; every process stopped by pid in ``close``."""

    def __init__(self, root: Path, url: str, args: argparse.Namespace, logs: dict[str, Path],
                 plain: bool = False) -> None:
        self.root, self.url, self.args = root, url, args
        self.plain = plain  # one supervisor without --name: what a member costs, beside it
        self.members: dict[str, Member] = {}
        self.procs: list[subprocess.Popen[bytes]] = []  # every member process ever started
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant seen
        self.logs = logs  # label -> log path, read at the end of the run
        root.mkdir(parents=True, exist_ok=True)

    def start(self, name: str) -> Member:
        import cluster_bench_app

        state_dir = self.root / name
        log_path = self.root / f"{name}.log"
        self.logs[f"{self.root.name}/{name}"] = log_path
        log_file = open(log_path, "a")  # noqa: SIM115 (closed in close(); a restart appends)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
        env.update(CLUSTER_MEMBER=name, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO_ROOT)]))
        member_args = [] if self.plain else ["--name", name, "--lease", f"{self.args.lease:g}"]
        cmd = [sys.executable, "-m", "capsule_actors", "run", APP, "--state-dir", str(state_dir),
               "--store", self.url, *member_args,
               "--workers", str(self.args.workers), "--process-workers", str(self.args.process_workers),
               "--grace", "2"]
        proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        old = self.members.get(name)
        if old is not None:
            old.log_file.close()
        member = Member(name, state_dir, proc, log_file, cluster_bench_app.make_app(state_dir))
        self.members[name] = member
        return member

    def track(self, member: Member) -> list[tuple[int, float]]:
        found = descendants(member.pid)
        self.seen.update(found)
        return found

    def status(self, member: Member, timeout: float = 15.0) -> dict[str, Any] | None:
        """``capsule-actors status --json`` of the member, or None when its supervisor does not answer."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO_ROOT)]))
        try:
            r = subprocess.run([sys.executable, "-m", "capsule_actors", "status", "--json", "--state-dir",
                                str(member.state_dir)], capture_output=True, text=True, timeout=timeout,
                               cwd=self.root, env=env)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        with contextlib.suppress(ValueError):
            status = json.loads(r.stdout)
            if isinstance(status, dict) and status.get("supervisor", {}).get("state") != "stopped":
                return status
        return None

    def wait_joined(self, member: Member, deadline: Deadline) -> dict[str, Any]:
        def joined() -> dict[str, Any] | None:
            if member.proc.poll() is not None:
                raise RuntimeError(f"member {member.name} exited with {member.proc.returncode}; "
                                   f"log: {self.root / (member.name + '.log')}\n{self.tail(member)}")
            status = self.status(member, timeout=min(15.0, deadline.left()))
            me = (status or {}).get("member") or {}
            if status is None or (me.get("name") != member.name and not self.plain):
                return None
            return status if status["actors"] and all(a["state"] == "ready" for a in status["actors"]) else None

        status: dict[str, Any] = wait_until(joined, deadline, 0.1)
        self.track(member)
        return status

    def formed(self, names: list[str], min_shards: int) -> dict[str, dict[str, Any]] | None:
        """Every one of ``names`` answers and lists exactly ``names`` as live (with their pids),
        with all 64 shards between them, at least ``min_shards`` each, and one clock."""
        statuses = {}
        for name in names:
            status = self.status(self.members[name])
            if status is None:
                return None
            live = {m["name"]: m for m in status.get("members") or [] if m["state"] == "live"}
            if set(live) != set(names) or any(live[n]["pid"] != self.members[n].pid for n in names):
                return None
            shards = [m["shards"] for m in live.values()]
            if sum(shards) != SHARDS or min(shards) < min_shards:
                return None
            if sum(1 for m in live.values() if m["clock"]) != 1:
                return None
            statuses[name] = status
        return statuses

    def wait_formed(self, names: list[str], min_shards: int, deadline: Deadline) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = wait_until(lambda: self.formed(names, min_shards), deadline, 0.1)
        return result

    def kill(self, member: Member) -> int:
        """SIGKILL the member's process group, and any descendant of it outside the group (none is
        expected: the actor template and its actors stay in the member's group); how many were."""
        kids = self.track(member)
        outside = []
        for pid, created in kids:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) != member.pid:
                    outside.append((pid, created))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(member.pid, signal.SIGKILL)
        kill_pids(outside)
        with contextlib.suppress(subprocess.TimeoutExpired):
            member.proc.wait(10)
        return len(outside)

    def tail(self, member: Member, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.root / f"{member.name}.log").read_text(errors="replace")[-chars:]
        return ""

    def close(self) -> None:
        """SIGTERM every member still running (a graceful stop), SIGKILL after 5 s to its group
        and every descendant ever seen."""
        for member in self.members.values():
            with contextlib.suppress(Exception):
                self.track(member)
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 5.0
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, end - time.monotonic()))
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        kill_pids(list(self.seen.items()))
        for member in self.members.values():
            with contextlib.suppress(Exception):
                member.log_file.close()
        from capsule_actors.client import Client

        Client.close_all()


def wait_until(predicate: Callable[[], Any], deadline: Deadline, interval: float) -> Any:
    while True:
        value = predicate()
        if value:
            return value
        deadline.left()  # raises TimeoutError past it
        time.sleep(interval)


def start_members(cluster: Cluster, names: list[str], deadline: Deadline) -> None:
    """The first member alone until it has joined (it creates the schema: two first starts at
    once on a fresh schema race in ``CREATE SCHEMA IF NOT EXISTS``, and one exits with a
    UniqueViolation), then the others together."""
    first = cluster.start(names[0])
    cluster.wait_joined(first, deadline)
    for name in names[1:]:
        cluster.start(name)
    for name in names[1:]:
        cluster.wait_joined(cluster.members[name], deadline)


# ---- throughput ---------------------------------------------------------------------------------
def stats(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in samples]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


Batch = Callable[[int], list[cpsl.TaskHandle]]
One = Callable[[int], cpsl.TaskHandle]


def measure(what: str, batch: Batch, one: One | None, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``batch(n)`` submits n tasks (each returns the member that ran it): warmed up with 100,
    then ``--repeat`` runs of ``--n``, each until every result is in; then, with ``one``,
    ``--rt`` sequential round trips."""
    cpsl.wait_all(batch(100), timeout=Deadline(60, f"{what}: warm-up").left())
    runs, submit_rates, where = [], [], collections.Counter[str]()
    for r in range(args.repeat):
        deadline = Deadline(60 + args.n / 50, f"{what}: run {r + 1}")
        t0 = time.perf_counter()
        handles = batch(args.n)
        t_sub = time.perf_counter()
        ran_on = cpsl.wait_all(handles, timeout=deadline.left())
        t1 = time.perf_counter()
        assert len(ran_on) == args.n and set(ran_on) <= set(names), collections.Counter(ran_on)
        runs.append(args.n / (t1 - t0))
        submit_rates.append(args.n / (t_sub - t0))
        where.update(ran_on)
    rt = None
    if one is not None:
        rt_deadline = Deadline(60 + 0.2 * args.rt, f"{what}: round trips")
        samples = []
        for i in range(RT_WARMUP + args.rt):
            t0 = time.perf_counter()
            one(i).result(timeout=rt_deadline.left())
            if i >= RT_WARMUP:
                samples.append(time.perf_counter() - t0)
        rt = {"n": args.rt, **stats(samples)}
    total = sum(where.values())
    return {"n": args.n, "repeat": args.repeat, "tasks_per_s": median(runs), "runs_tasks_per_s": runs,
            "submit_per_s": median(submit_rates), "ran_on": {name: where.get(name, 0) / total for name in names},
            "rt": rt}


def throughput(n_members: int, url: str, root: Path, args: argparse.Namespace, logs: dict[str, Path],
               dog: Watchdog) -> list[dict[str, Any]]:
    cluster = Cluster(root / f"n{n_members}", url, args, logs, plain=n_members == 0)
    dog.on_expire(cluster.close)
    names = [f"m{i}" for i in range(1, max(1, n_members) + 1)]
    try:
        start = Deadline(90, f"{n_members} member(s) joining")
        start_members(cluster, names, start)
        if not cluster.plain:
            cluster.wait_formed(names, SHARDS // (2 * n_members), start)
        app = cluster.members["m1"].app
        noop, locked = app.tasks["noop"], app.tasks["locked_noop"]
        def key(i: int) -> str:
            return f"key{i % args.keys}"

        variants: list[tuple[str, Batch, One | None]] = []
        if "submit" in args.apis:
            variants += [
                ("submit unlocked", lambda n: [noop.submit(i) for i in range(n)], noop.submit),
                ("submit locked", lambda n: [locked.submit(key(i), i) for i in range(n)],
                 lambda i: locked.submit(key(i), i)),
            ]
        if "map" in args.apis:
            variants += [
                ("map unlocked", lambda n: noop.map(range(n)), None),
                ("map locked", lambda n: locked.map([(key(i), i) for i in range(n)]), None),
            ]
        rows = []
        for label, batch, one in variants:
            row = measure(f"{n_members} member(s), {label}", batch, one, names, args)
            rows.append({"members": n_members, "variant": label, **row})
            print(f"  {n_members} member(s), {label}: {row['tasks_per_s']:,.0f} tasks/s", flush=True)
        return rows
    finally:
        cluster.close()


# ---- failover -----------------------------------------------------------------------------------
def starts(path: Path) -> list[tuple[str, str, float]]:
    """(member, key, time) of every ``hold`` attempt that started."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) == 4 and fields[0] == "start":
                out.append((fields[1], fields[2], float(fields[3])))
    return out


def failover(url: str, root: Path, args: argparse.Namespace, logs: dict[str, Path], dog: Watchdog) -> dict[str, Any]:
    cluster = Cluster(root / "failover", url, args, logs)
    dog.on_expire(cluster.close)
    names = ["m1", "m2"]
    record = cluster.root / "starts.csv"
    rounds: list[dict[str, Any]] = []
    try:
        start = Deadline(90, "failover: 2 members joining")
        start_members(cluster, names, start)
        cluster.wait_formed(names, SHARDS // 4, start)
        for i in range(args.kills):
            key, stop = f"r{i}", cluster.root / f"stop{i}"
            via = cluster.members["m1"]
            h = via.app.tasks["hold"].submit(key, str(record), str(stop), 120.0)
            running = Deadline(30, f"failover round {i + 1}: the task starting")
            first = wait_until(lambda k=key: [s for s in starts(record) if s[1] == k], running, 0.005)[0]
            victim = cluster.members[first[0]]
            survivor = cluster.members[next(n for n in names if n != victim.name)]

            killed_at = time.time()
            outside = cluster.kill(victim)
            from capsule_actors.client import Client

            Client.close_all(victim.state_dir)
            again = Deadline(args.lease + 60, f"failover round {i + 1}: the next attempt on {survivor.name}")
            nxt = wait_until(lambda k=key, t=killed_at: [s for s in starts(record) if s[1] == k and s[2] > t],
                             again, 0.005)[0]
            seconds = nxt[2] - killed_at

            stop.touch()
            done = Deadline(60, f"failover round {i + 1}: the task's result")
            handle = cpsl.TaskHandle.from_id(survivor.app, h.id)
            result = handle.result(timeout=done.left())
            info = handle.info()

            restarted_at = time.monotonic()
            cluster.start(victim.name)
            rejoin = Deadline(90, f"failover round {i + 1}: {victim.name} rejoining")
            cluster.wait_joined(cluster.members[victim.name], rejoin)
            cluster.wait_formed(names, SHARDS // 4, rejoin)
            rounds.append({
                "victim": victim.name, "survivor": survivor.name, "failover_s": seconds,
                "next_attempt_on": nxt[0], "result": result, "attempts": info.attempts,
                "state": info.state.value, "outside_group": outside,
                "rejoin_s": time.monotonic() - restarted_at,
            })
            if args.progress:
                print(f"  kill {i + 1}/{args.kills}: {victim.name} killed, the task started again on {nxt[0]} "
                      f"after {seconds:.3f} s; attempts {info.attempts}", file=sys.stderr, flush=True)
        fo = [r["failover_s"] for r in rounds]
        rejoins = [r["rejoin_s"] for r in rounds]
        return {
            "lease_s": args.lease, "kills": len(rounds),
            "failover_s": {"p50": percentile(fo, 50), "p99": percentile(fo, 99), "max": max(fo), "min": min(fo)},
            "rejoin_s": {"p50": percentile(rejoins, 50), "p99": percentile(rejoins, 99), "max": max(rejoins)},
            "victims": dict(collections.Counter(r["victim"] for r in rounds)),
            "wrong": [r for r in rounds if r["next_attempt_on"] != r["survivor"] or r["result"] != r["survivor"]
                      or r["state"] != "SUCCEEDED" or r["attempts"] < 2],
            "outside_group": sum(r["outside_group"] for r in rounds),
            "rounds": rounds,
        }
    finally:
        cluster.close()


# ---- logs ---------------------------------------------------------------------------------------
def log_problems(logs: dict[str, Path]) -> dict[str, list[str]]:
    """Per member log: its lines naming ERROR or a Traceback (and the line after a Traceback's last)."""
    found: dict[str, list[str]] = {}
    for label, path in logs.items():
        with contextlib.suppress(OSError):
            hits = [line for line in path.read_text(errors="replace").splitlines()
                    if "ERROR" in line or "Traceback" in line or "CRITICAL" in line]
            if hits:
                found[label] = hits
    return found


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="tasks per throughput run (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per row, median shown (default 3)")
    parser.add_argument("--keys", type=int, default=64, help="lock keys of the locked rows (default 64)")
    parser.add_argument("--rt", type=int, default=200, help="sequential round trips per row (default 200)")
    parser.add_argument("--api", default="submit,map",
                        help="how the throughput rows submit: submit (a loop), map (one batch); default both")
    parser.add_argument("--members", default="0,1,2,3",
                        help="member counts for throughput; 0: one supervisor without --name (default 0,1,2,3)")
    parser.add_argument("--workers", type=int, default=1, help="worker actors per member (default 1)")
    parser.add_argument("--process-workers", type=int, default=1, help="process actors per member (default 1)")
    parser.add_argument("--kills", type=int, default=20, help="failover rounds, 0 to skip (default 20)")
    parser.add_argument("--lease", type=float, default=2.0, help="every member's --lease in seconds (default 2)")
    parser.add_argument("--no-throughput", action="store_true", help="failover only")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="an existing PostgreSQL server (postgresql://…); default: a server of this run's own")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True,
                        help="fsync on the server of this run's own (default: on)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--progress", action="store_true", help="one line per failover round on stderr")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds for the whole run (default 300 + 120 per member count + 30 per kill)")
    args = parser.parse_args(argv)
    args.apis = {a.strip() for a in args.api.split(",") if a.strip()}
    if not args.apis or not args.apis <= {"submit", "map"}:
        parser.error("--api: submit, map or submit,map")
    args.counts = [] if args.no_throughput else [int(c) for c in args.members.split(",") if c.strip()]
    if args.n < 1 or args.rt < 1 or args.repeat < 1 or args.keys < 1 or args.kills < 0 or args.lease <= 0:
        parser.error("--n, --rt, --repeat, --keys >= 1; --kills >= 0; --lease > 0")
    if any(not 0 <= c <= 9 for c in args.counts) or args.workers < 1 or args.process_workers < 0:
        parser.error("--members: counts in 0-9; --workers >= 1; --process-workers >= 0")
    return args


def report(args: argparse.Namespace, rows: list[dict[str, Any]], fo: dict[str, Any] | None,
           problems: dict[str, list[str]]) -> None:
    if rows:
        print()
        print(f"throughput: {args.n} no-op tasks submitted through m1 (a submit() loop, or one map()), then "
              f"every result; median of {args.repeat}; locked: {args.keys} keys, on_conflict=queue")
        print(f"RT: {args.rt} sequential submit -> result round trips through m1 (after {RT_WARMUP})")
        print(f"{'members':>7}  {'variant':<16} {'tasks/s':>8}  {'submit/s':>8}  {'ran on m1/m2/m3':<16} "
              f"{'RT p50 ms':>9}  {'RT p99 ms':>9}")
        for r in rows:
            spread = "/".join(f"{share:.0%}" for share in r["ran_on"].values())
            rt = f"{r['rt']['p50_ms']:>9.2f}  {r['rt']['p99_ms']:>9.2f}" if r["rt"] else f"{'-':>9}  {'-':>9}"
            print(f"{r['members']:>7}  {r['variant']:<16} {r['tasks_per_s']:>8,.0f}  {r['submit_per_s']:>8,.0f}  "
                  f"{spread:<16} {rt}")
    if fo is not None:
        f, rj = fo["failover_s"], fo["rejoin_s"]
        print()
        print(f"failover: 2 members, lease {fo['lease_s']:g} s, {fo['kills']} SIGKILLs of the member running a "
              f"locked task (victims {fo['victims']}); retry without backoff")
        print(f"{'':<46} {'p50 s':>6}  {'p99 s':>6}  {'max s':>6}  {'min s':>6}")
        print(f"{'kill -> next attempt starts on the survivor':<46} {f['p50']:>6.3f}  {f['p99']:>6.3f}  "
              f"{f['max']:>6.3f}  {f['min']:>6.3f}")
        print(f"{'victim restarted -> holds 16+ shards again':<46} {rj['p50']:>6.3f}  {rj['p99']:>6.3f}  "
              f"{rj['max']:>6.3f}")
        slow = [r["failover_s"] for r in fo["rounds"] if r["failover_s"] > fo["lease_s"] + 1.0]
        if slow:
            print(f"note: {len(slow)} failover(s) took longer than the lease + 1 s: "
                  + ", ".join(f"{x:.3f} s" for x in slow))
        if fo["wrong"]:
            print(f"UNEXPECTED rounds (next attempt not on the survivor, or not SUCCEEDED): {fo['wrong']}")
        if fo["outside_group"]:
            print(f"note: {fo['outside_group']} process(es) of the victims were outside their process group "
                  f"and were SIGKILLed by pid at once")
    print()
    if problems:
        print("member logs: ERROR / Traceback lines")
        for label, lines in problems.items():
            print(f"  {label}: {len(lines)} line(s)")
            for line in lines[:8]:
                print(f"    {line[:300]}")
    else:
        print("member logs: no ERROR or Traceback lines")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hard = args.hard_limit or 300 + 120 * len(args.counts) + 30 * args.kills
    when = datetime.datetime.now(datetime.UTC)
    info = machine_info()
    print(f"capsule_actors {cpsl.__version__}: a cluster on one PostgreSQL schema, {when:%Y-%m-%d %H:%M} UTC")
    print_machine()
    print_package(Path(cpsl.__file__).resolve().parent)
    print(f"os.cpu_count() = {os.cpu_count()}: every member, the client and PostgreSQL share these CPUs, so "
          f"more members on this machine show the coordination cost, not scale-out")
    with contextlib.suppress(OSError):
        print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    schemas: list[str] = []
    tag = f"cl{os.getpid()}"
    logs: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    fo: dict[str, Any] | None = None
    with Watchdog(hard, "cluster.py") as dog, temp_dir("cpsl-bench-cl-") as tmp, \
            postgres(args.store, args.fsync, schemas, dog) as (base, note):
        print(note)
        print(f"members: --workers {args.workers} --process-workers {args.process_workers} --lease {args.lease:g}")
        try:
            for count in args.counts:
                schemas.append(f"{tag}_n{count}")
                rows += throughput(count, with_schema(base, schemas[-1]), tmp, args, logs, dog)
            if args.kills:
                schemas.append(f"{tag}_fo")
                fo = failover(with_schema(base, schemas[-1]), tmp, args, logs, dog)
        except BaseException:
            for label, lines in log_problems(logs).items():  # the temp directory goes with the error
                print(f"member log {label}: " + "\n    ".join(lines[:20]), file=sys.stderr)
            raise
        problems = log_problems(logs)
    report(args, rows, fo, problems)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date_utc": when.isoformat(timespec="seconds"), "machine": info, "cpu_count": os.cpu_count(),
            "store": "own server" if args.store is None else args.store, "fsync": args.fsync,
            "args": {k: v for k, v in vars(args).items() if k not in ("counts", "apis")}, "throughput": rows,
            "failover": fo, "log_problems": problems,
        }, indent=2))
        print(f"wrote {args.json}")
    return 1 if fo is not None and fo["wrong"] else 0


if __name__ == "__main__":
    run_script(main, __file__)
