"""A cluster: several `capsule-actors run --name NAME` supervisors (members) on one PostgreSQL store.

Every member is a real supervisor process with its own state directory, started here by pid on
the session's PostgreSQL server with a fresh schema per test (``pg_url``) and ``--lease 2``; the
``cluster`` fixture SIGKILLs every member and every descendant it saw at teardown. The app they
run is ``tests/cluster_app.py``: each member has ``CLUSTER_MEMBER=<name>`` in its environment, so
tasks know where they run, and the locked task ``held`` writes start / tick (every 50 ms) / end
lines and holds a non-blocking flock on a file of its key, into a record file the test reads.

What is checked, each with members started, stopped, frozen or killed by pid:
- ``--name`` needs a PostgreSQL store (a ConfigError before anything starts);
- ``status`` of every member lists every member: live ones, 64 shards between them, one clock;
- unlocked work overflowing one member is run by the other (the shared pool in the store);
- a lock key never runs on two members at once, whichever member the task was submitted to;
- a SIGKILLed member: "lost" after the lease, its running attempts end with WorkerCrashed naming
  it and run again on the survivor, its actors died with it, no key ever ran twice at once;
- a frozen (SIGSTOPped) member: its actors stop by themselves, the survivor takes over, and when
  it wakes up it rejoins as a new incarnation whose late writes changed nothing;
- a schedule fires once per slot across the cluster, and goes on after its clock member dies;
- a graceful stop (SIGTERM) hands the shards and the clock over at once.

A run that was killed never writes ``end``: its last ``tick`` is when it last ran (within 50 ms),
so "no key ran twice at once" compares each run's first line with the previous run's last line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import netns
import psutil
import pytest
from conftest import ROOT, cli, kill_tree, wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.transport import RUNTIME_FILE

TESTS = Path(__file__).resolve().parent
LEASE = 2.0  # every member's --lease here (the default is 6 s)
SHARDS = 64
APP = "cluster_app:app"


# ---- the harness ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Member:
    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: TextIO
    app: cpsl.App  # the same App as the members run, bound to this member's state directory

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""


class Cluster:
    """The members a test starts on one store URL (one schema); all stopped by pid at teardown."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.members: dict[str, Member] = {}
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant of a member seen
        self.records = str(root / "records.csv")

    # -- starting and stopping
    def start(self, name: str, *, workers: int = 1, process_workers: int = 1, lease: float = LEASE,
              env: dict[str, str] | None = None, wait: bool = True, url: str | None = None,
              prefix: tuple[str, ...] = ()) -> Member:
        """``capsule-actors run cluster_app:app --name NAME`` on a state directory of its own; with
        ``wait``, until it has joined (its status names it) and its actors are ready."""
        import cluster_app

        state_dir = self.root / name
        log_path = self.root / (f"{name}.log" if name not in self.members else f"{name}.{len(self.members)}.log")
        log_file = open(log_path, "w")  # noqa: SIM115 (closed at teardown)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
        environ.update(env or {}, CLUSTER_MEMBER=name, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
        cmd = [*prefix, sys.executable, "-m", "capsule_actors", "run", APP, "--state-dir", str(state_dir),
               "--store", url or self.url,
               *self.cluster_args(name, lease), "--workers", str(workers), "--process-workers",
               str(process_workers), "--grace", "5"]
        proc = subprocess.Popen(cmd, cwd=self.root, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
        if name in self.members:  # a restart: the old one stays known (and stopped) under another name
            before = self.members.pop(name)
            self.members[f"{name}@{before.pid}"] = before
        member = Member(name, state_dir, proc, log_path, log_file, cluster_app.make_app(state_dir))
        self.members[name] = member
        if wait:
            self.wait_joined(member)
        return member

    @staticmethod
    def cluster_args(name: str, lease: float) -> list[str]:
        return ["--name", name, "--lease", f"{lease:g}"]

    def wait_joined(self, member: Member, timeout: float = 60.0) -> dict[str, Any]:
        def joined() -> dict[str, Any] | None:
            if member.proc.poll() is not None:
                pytest.fail(f"member {member.name} exited with {member.proc.returncode}:\n{member.log()}")
            status = self.try_status(member)
            if not status or not status.get("member") or status["member"].get("name") != member.name:
                return None
            return status if status["actors"] and all(a["state"] == "ready" for a in status["actors"]) else None

        status: dict[str, Any] = wait_until(joined, timeout, interval=0.2)
        self.track(member)
        return status

    def track(self, member: Member) -> list[int]:
        """The member's descendants now (template, actors); remembered for the teardown."""
        pids = []
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(member.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen[p.pid] = p.create_time()
                    pids.append(p.pid)
        return pids

    def stop_all(self) -> None:
        for member in self.members.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, signal.SIGCONT)  # a frozen one too (SIGKILL works either way)
            kill_tree(member.pid)
        for pid, created in self.seen.items():  # orphans of a member killed earlier
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).create_time() == created:
                    os.kill(pid, signal.SIGKILL)
        for member in self.members.values():
            with contextlib.suppress(Exception):
                member.proc.wait(10)
            member.log_file.close()

    # -- reading
    def try_status(self, member: Member, timeout: float = 20.0) -> dict[str, Any] | None:
        """``capsule-actors status --json`` of this member, or None when it does not answer."""
        try:
            r = cli("status", "--json", state_dir=member.state_dir, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        with contextlib.suppress(ValueError):
            status = json.loads(r.stdout)
            running = isinstance(status, dict) and status.get("supervisor", {}).get("state") != "stopped"
            return status if running else None
        return None

    def status(self, member: Member) -> dict[str, Any]:
        r = cli("status", "--json", state_dir=member.state_dir, timeout=30)
        assert r.returncode == 0, f"status of {member.name}: {r.stderr}\n{member.log()}"
        return dict(json.loads(r.stdout))

    def formed(self, *names: str, min_shards: int = 1) -> Callable[[], dict[str, dict[str, Any]] | None]:
        """A predicate: every one of ``names`` answers, each lists exactly ``names`` as its live
        members (with their pids), their shards add up to 64 (each with at least ``min_shards``)
        and one of them holds the clock. Its value: each member's status."""
        def check() -> dict[str, dict[str, Any]] | None:
            statuses = {}
            for name in names:
                status = self.try_status(self.members[name])
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
        return check

    def wait_formed(self, *names: str, min_shards: int = 1, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = wait_until(self.formed(*names, min_shards=min_shards), timeout, 0.2)
        return result


@pytest.fixture
def cluster(pg_url: str) -> Iterator[Cluster]:
    """A short private directory (ipc socket paths must stay under ~100 bytes) for the members'
    state directories, logs and record files; every member killed by pid before it is removed."""
    root = Path(tempfile.mkdtemp(prefix="cpsl-cl-"))
    c = Cluster(root, pg_url)
    try:
        yield c
    finally:
        c.stop_all()
        for member in c.members.values():  # shown with a failed test's output
            print(f"---- log of member {member.name} (pid {member.pid}) ----\n{member.log(8000)}")
        shutil.rmtree(root, ignore_errors=True)


# ---- reading the record file and the store ------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One attempt of ``held``, as its lines tell it."""

    run: str
    member: str
    tag: str
    key: str
    first: float
    last: float
    ended: bool = False


def lines(path: str) -> list[list[str]]:
    with contextlib.suppress(FileNotFoundError):
        return [line.split(",") for line in Path(path).read_text().splitlines() if line]
    return []


def runs_of(path: str) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for kind, member, tag, key, run, t in lines(path):
        if kind not in ("start", "tick", "end"):
            continue
        r = runs.setdefault(run, Run(run, member, tag, key, float(t), float(t)))
        r.first, r.last = min(r.first, float(t)), max(r.last, float(t))
        r.ended = r.ended or kind == "end"
    return runs


def overlap_lines(path: str) -> list[list[str]]:
    return [fields for fields in lines(path) if fields[0] == "overlap"]


def open_runs(path: str, member: str) -> list[Run]:
    """Runs on ``member`` that started and did not end (yet)."""
    return [r for r in runs_of(path).values() if r.member == member and not r.ended]


def assert_no_key_ran_twice_at_once(path: str) -> dict[str, list[Run]]:
    """No flock was ever refused, and per key every run began after the previous one's last line."""
    assert overlap_lines(path) == [], f"a key's lock file was held by another run: {overlap_lines(path)}"
    by_key: dict[str, list[Run]] = collections.defaultdict(list)
    for r in runs_of(path).values():
        by_key[r.key].append(r)
    for key, runs in by_key.items():
        runs.sort(key=lambda r: r.first)
        for a, b in itertools.pairwise(runs):
            assert b.first > a.last, (
                f"key {key}: run {b.run} on {b.member} started at {b.first:.3f} while run {a.run} on "
                f"{a.member} ran until {a.last:.3f}"
            )
    return by_key


def runs_by_tag(path: str) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = collections.defaultdict(list)
    for r in runs_of(path).values():
        out[r.tag].append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r.first)
    return out


def record(member: Member, task_id: str) -> dict[str, Any]:
    """The task's record, asked of ``member`` (bounded)."""
    body, _ = member.app.client().call(lambda req: messages.Info(req, [task_id]), timeout=15)
    assert body and body[0] is not None, f"no task {task_id}"
    return dict(body[0])


def events(member: Member, task_id: str) -> list[dict[str, Any]]:
    """The task's events so far, asked of ``member`` (it has some: the call does not wait for more)."""
    body, _ = member.app.client().call(lambda req: messages.Events(req, task_id, 0), timeout=15)
    return list(body["events"])


def results(member: Member, ids: list[str], timeout: float) -> list[Any]:
    """Every task's result, each re-attached through ``member`` (any member answers for any task
    of the cluster)."""
    handles = [cpsl.TaskHandle.from_id(member.app, task_id) for task_id in ids]
    return cpsl.wait_all(handles, timeout=timeout)


def gone(pids: list[int]) -> bool:
    def alive(pid: int) -> bool:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return False
    return not any(alive(pid) for pid in pids)


def row(status: dict[str, Any], member_id: int) -> dict[str, Any] | None:
    return next((m for m in status.get("members") or [] if m["id"] == member_id), None)


def submit_held(cluster: Cluster, via: list[Member], keys: int, per_key: int, seconds: float) -> dict[str, str]:
    """``held`` on ``keys`` keys, ``per_key`` tasks each, submitted round-robin through ``via``
    (one thread per member, concurrently); returns tag -> task id."""
    jobs: dict[str, list[tuple[str, str]]] = {m.name: [] for m in via}
    for i, (n, k) in enumerate(itertools.product(range(per_key), range(keys))):
        jobs[via[i % len(via)].name].append((f"key{k}", f"t{n}-{k}"))

    def send(member: Member) -> dict[str, str]:
        held = member.app.tasks["held"]
        return {tag: held.submit(key, seconds, cluster.records, tag).id for key, tag in jobs[member.name]}

    with concurrent.futures.ThreadPoolExecutor(len(via)) as pool:
        parts = list(pool.map(send, via))
    return {tag: task_id for part in parts for tag, task_id in part.items()}


# ---- the tests -----------------------------------------------------------------------------------
def test_name_without_a_postgresql_store_is_refused_before_anything_starts(tmp_path):
    with tempfile.TemporaryDirectory(prefix="cpsl-") as d:
        state_dir = Path(d) / "state"
        for store in ([], ["--store", str(tmp_path / "tasks.db")]):  # SQLite: default, or a file
            r = cli("run", APP, *store, "--name", "alpha", "--lease", "2", state_dir=state_dir, cwd=TESTS, timeout=60)
            assert r.returncode != 0, (store, r.stdout, r.stderr)
            assert "ConfigError" in r.stderr and "--name" in r.stderr and "postgresql" in r.stderr.lower(), r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            assert not (state_dir / RUNTIME_FILE).exists()  # nothing started


@pytest.mark.timeout(150)
def test_every_member_lists_the_cluster_with_its_shards_and_one_clock(cluster):
    # Given two members on one store
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")

    # Then each one's status lists both as live, their 64 shards between them (the joiner gets
    # some once the cluster is idle), and exactly one of them keeps the clock
    statuses = cluster.wait_formed("alpha", "bravo")
    ids = {}
    for name, status in statuses.items():
        me = status["member"]
        assert me["name"] == name and isinstance(me["id"], int)
        ids[name] = me["id"]
    assert ids["alpha"] != ids["bravo"]
    for name, status in statuses.items():
        rows = status["members"]
        assert [m["id"] for m in rows] == sorted((m["id"] for m in rows), reverse=True)  # newest first
        assert {(m["id"], m["name"]) for m in rows} == {(ids["alpha"], "alpha"), (ids["bravo"], "bravo")}, name
        for m in rows:
            assert m["state"] == "live" and m["pid"] == cluster.members[m["name"]].pid
            assert isinstance(m["host"], str) and m["host"]
            assert isinstance(m["joined"], float) and isinstance(m["renewed"], float) and m["joined"] <= m["renewed"]
            assert isinstance(m["shards"], int) and isinstance(m["clock"], bool)

    # ... and their leases are renewed while they run (well within a lease)
    before = {m["id"]: m["renewed"] for m in statuses["alpha"]["members"]}

    def renewed() -> bool:
        status = cluster.try_status(bravo)
        return status is not None and all(m["renewed"] > before[m["id"]] for m in status["members"])
    wait_until(renewed, 2 * LEASE + 5, interval=0.2)

    # ... and the text status has a members section naming both
    for member in (alpha, bravo):
        text = cli("status", state_dir=member.state_dir, timeout=30)
        assert text.returncode == 0, text.stderr
        assert "members" in text.stdout.lower() and "alpha" in text.stdout and "bravo" in text.stdout, text.stdout


@pytest.mark.timeout(120)
def test_members_started_together_on_a_new_schema_both_join(cluster):
    # Given three members started at the same moment on a schema nobody made yet
    members = [cluster.start(name, wait=False) for name in ("alpha", "bravo", "charlie")]

    # Then each one joins (creating the schema is one member's job, the others wait for it)
    for member in members:
        cluster.wait_joined(member)
    cluster.wait_formed("alpha", "bravo", "charlie")


@pytest.mark.timeout(180)
def test_unlocked_work_beyond_one_members_queue_is_shared(cluster):
    # Given two members with one process actor each
    alpha = cluster.start("alpha")
    cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo")

    # When 400 process=True tasks are submitted through alpha (more than it keeps queued in memory)
    handles = alpha.app.tasks["where"].map([0.1] * 400)

    # Then every one succeeds, and bravo ran some of them (from the store's shared pool)
    ran_on = cpsl.wait_all(handles, timeout=150)
    counts = collections.Counter(ran_on)
    assert set(counts) == {"alpha", "bravo"}, counts


@pytest.mark.timeout(180)
def test_a_lock_key_never_runs_on_two_members_at_once(cluster):
    # Given two members that share the shards about evenly
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)

    # When locked tasks on 24 keys are submitted through both members at once
    ids = submit_held(cluster, [alpha, bravo], keys=24, per_key=3, seconds=0.2)

    # Then every one succeeds, each ran once, keys on both members, and no key ran twice at once
    ran_on = results(alpha, list(ids.values()), timeout=120)
    assert set(ran_on) == {"alpha", "bravo"}
    for tag, task_id in ids.items():
        rec = record(bravo, task_id)
        assert rec["state"] == "SUCCEEDED" and rec["attempts"] == 1, (tag, rec)
    by_tag = runs_by_tag(cluster.records)
    assert sorted(by_tag) == sorted(ids) and all(len(runs) == 1 and runs[0].ended for runs in by_tag.values())
    assert_no_key_ran_twice_at_once(cluster.records)

    # ... and the board of either member's state directory shows every task of the cluster
    from capsule_actors import store

    for member in (alpha, bravo):
        reader = store.open_reader(member.state_dir)
        assert reader is not None
        try:
            columns = {c["state"]: c for c in reader.board(page_size=100)["columns"]}
        finally:
            reader.close()
        assert columns["SUCCEEDED"]["count"] == len(ids), member.name
        assert {t["id"] for t in columns["SUCCEEDED"]["tasks"]} == set(ids.values())


@pytest.mark.timeout(180)
def test_a_killed_members_attempts_are_crashed_naming_it_and_run_again_elsewhere(cluster):
    # Given two members running locked tasks (3 s each) on 24 keys, submitted through both
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    bravo_id = cluster.status(bravo)["member"]["id"]
    ids = submit_held(cluster, [alpha, bravo], keys=24, per_key=2, seconds=3.0)
    wait_until(lambda: open_runs(cluster.records, "alpha") and open_runs(cluster.records, "bravo"), 30, 0.05)

    # When bravo is SIGKILLed while it runs some of them
    descendants = cluster.track(bravo)
    assert descendants
    killed = {r.tag for r in open_runs(cluster.records, "bravo") if r.first > time.time() - 2.0}  # 1 s+ to go
    assert killed
    os.kill(bravo.pid, signal.SIGKILL)
    killed_at = time.time()
    bravo.proc.wait(10)

    # Then its actors died with it: nothing of it is left running
    wait_until(lambda: gone(descendants), 15)

    # ... and every task succeeds, asked through the survivor (also those submitted through bravo)
    ran_on = results(alpha, list(ids.values()), timeout=120)
    assert set(ran_on) <= {"alpha", "bravo"}

    # ... and the survivor says bravo is lost and holds every shard and the clock
    def taken_over() -> dict[str, Any] | None:
        status = cluster.try_status(alpha)
        if status is None or (r := row(status, bravo_id)) is None or r["state"] != "lost":
            return None
        live = [m for m in status["members"] if m["state"] == "live"]
        return status if [(m["name"], m["shards"], m["clock"]) for m in live] == [("alpha", SHARDS, True)] else None
    wait_until(taken_over, LEASE + 15, interval=0.2)

    # ... and each attempt bravo was running ended with WorkerCrashed naming bravo, then ran again
    # on alpha, to its end, only after bravo's run had stopped
    by_tag = runs_by_tag(cluster.records)
    for tag in killed:
        rec = record(alpha, ids[tag])
        assert rec["state"] == "SUCCEEDED" and rec["attempts"] >= 2, (tag, rec)
        texts = [json.dumps(e["data"]) for e in events(alpha, ids[tag])]
        assert any("WorkerCrashed" in t and "bravo" in t for t in texts), (tag, texts)
        first, last = by_tag[tag][0], by_tag[tag][-1]
        assert first.member == "bravo" and not first.ended and first.last < killed_at + 1.0
        assert last.member == "alpha" and last.ended and last.first > killed_at
    assert_no_key_ran_twice_at_once(cluster.records)


@pytest.mark.timeout(180)
def test_a_frozen_member_is_fenced_and_rejoins_as_a_new_incarnation(cluster):
    # Given two members, and bravo running a long locked task
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    ids = submit_held(cluster, [alpha], keys=24, per_key=1, seconds=6.0)
    wait_until(lambda: open_runs(cluster.records, "bravo"), 30, 0.05)
    before = cluster.status(bravo)
    old_id = before["member"]["id"]
    actor_pids = [a["pid"] for a in before["actors"] if a["pid"]]
    assert actor_pids
    cluster.track(bravo)
    frozen = {r.tag for r in open_runs(cluster.records, "bravo") if r.first > time.time() - 3.0}  # 3 s+ to go
    assert frozen

    # When bravo's supervisor (that process only) is SIGSTOPped past its lease
    os.kill(bravo.pid, signal.SIGSTOP)
    try:
        stopped_at = time.time()
        # Then its actors stop by themselves within the lease (and a little)
        wait_until(lambda: gone(actor_pids), LEASE + 6, interval=0.1)

        # ... and alpha takes the tasks over: each succeeds, its last attempt ran on alpha
        ran_on = results(alpha, [ids[tag] for tag in frozen], timeout=90)
        assert ran_on == ["alpha"] * len(frozen)
        final = {tag: record(alpha, ids[tag]) for tag in frozen}
        by_tag = runs_by_tag(cluster.records)
        for tag, rec in final.items():
            assert rec["state"] == "SUCCEEDED" and rec["attempts"] >= 2, (tag, rec)
            # (bravo's run may have reached its end while its supervisor was frozen: never recorded)
            assert by_tag[tag][0].member == "bravo" and by_tag[tag][0].first < stopped_at
            assert by_tag[tag][-1].member == "alpha" and by_tag[tag][-1].ended
        assert_no_key_ran_twice_at_once(cluster.records)
    finally:
        # When bravo is woken up
        os.kill(bravo.pid, signal.SIGCONT)

    # Then it rejoins as a new incarnation (a new member id), and its old one is lost
    def rejoined() -> dict[str, Any] | None:
        status = cluster.try_status(bravo)
        me = (status or {}).get("member") or {}
        return status if me.get("name") == "bravo" and me.get("id") not in (None, old_id) else None
    status = wait_until(rejoined, 15, interval=0.2)
    new_id = status["member"]["id"]
    old_row = row(cluster.status(alpha), old_id)
    assert old_row is not None and old_row["state"] == "lost", old_row
    assert (new_row := row(cluster.status(alpha), new_id)) is not None and new_row["state"] == "live", new_row
    assert bravo.proc.poll() is None  # the same process
    log = bravo.log(1 << 30).lower()
    assert any(word in log for word in ("fenced", "rejoin", "incarnation")), bravo.log()

    # ... and its late writes were refused: the tasks stay as alpha finished them, seen from either
    # member, and no attempt starts again
    lines_before = len(lines(cluster.records))
    deadline = time.monotonic() + 3.0
    while True:
        for member in (alpha, bravo):
            for tag, rec in final.items():
                now = record(member, ids[tag])
                assert {k: now[k] for k in ("state", "attempts", "finished_at", "error_type")} == \
                    {k: rec[k] for k in ("state", "attempts", "finished_at", "error_type")}, (member.name, tag)
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    new_runs = [r for r in runs_of(cluster.records).values() if r.tag in frozen and r.first > stopped_at]
    assert all(r.member == "alpha" for r in new_runs) and len(new_runs) == len(frozen)
    # every other task succeeded too, and what the record file gained meanwhile was only their lines
    assert len(results(bravo, list(ids.values()), timeout=90)) == len(ids)
    assert not any(f[0] == "start" and f[2] in frozen for f in lines(cluster.records)[lines_before:])
    assert_no_key_ran_twice_at_once(cluster.records)


@pytest.mark.timeout(150)
def test_a_schedule_fires_once_per_slot_across_the_cluster_and_survives_its_clock(cluster):
    # Given two members with a schedule every 2 s (`*/2 * * * * *`)
    beats = str(cluster.root / "beats.csv")
    env = {"CLUSTER_BEAT_LOG": beats}
    cluster.start("alpha", env=env)
    cluster.start("bravo", env=env)
    cluster.wait_formed("alpha", "bravo")

    def fired(after: float = 0.0) -> list[tuple[str, float]]:
        return [(f[1], float(f[5])) for f in lines(beats) if f[0] == "beat" and float(f[5]) > after]

    wait_until(lambda: len(fired()) >= 3, 30, interval=0.1)  # ~6 s of the two running

    # When the member keeping the clock is SIGKILLed
    rows = cluster.status(cluster.members["alpha"])["members"]
    clock_name = next(m["name"] for m in rows if m["state"] == "live" and m["clock"])
    survivor = cluster.members["bravo" if clock_name == "alpha" else "alpha"]
    victim = cluster.members[clock_name]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    victim.proc.wait(10)

    # Then the survivor takes the clock over, and firings go on there
    def clock_taken() -> bool:
        status = cluster.try_status(survivor)
        live = [m for m in (status or {}).get("members") or [] if m["state"] == "live"]
        return [(m["name"], m["clock"]) for m in live] == [(survivor.name, True)]
    wait_until(clock_taken, LEASE + 15, interval=0.2)
    wait_until(lambda: len(fired(killed_at + LEASE)) >= 2, LEASE + 20, interval=0.1)
    assert {who for who, _ in fired(killed_at + 0.5)} == {survivor.name}

    # ... and no slot fired twice: a firing runs within a second of its slot, so the even second
    # before it names the slot (a late firing, within the 1 s misfire grace, still does)
    slots = [2 * math.floor(t / 2) for _, t in fired()]
    duplicates = [s for s, n in collections.Counter(slots).items() if n > 1]
    assert duplicates == [], (duplicates, fired())


@pytest.mark.timeout(150)
def test_a_graceful_stop_hands_the_shards_and_the_clock_over_at_once(cluster):
    # Given two members, and locked tasks queued on both (short ones, so none holds a key long)
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    alpha_id = cluster.status(alpha)["member"]["id"]
    ids = submit_held(cluster, [alpha, bravo], keys=24, per_key=6, seconds=0.3)
    wait_until(lambda: open_runs(cluster.records, "alpha"), 30, 0.05)

    # When alpha is stopped gracefully (SIGTERM)
    os.kill(alpha.pid, signal.SIGTERM)

    # Then within 5 s bravo holds all 64 shards and the clock, and alpha's row says "left"
    def handed_over() -> dict[str, Any] | None:
        status = cluster.try_status(bravo)
        if status is None or (r := row(status, alpha_id)) is None or r["state"] != "left":
            return None
        live = [m for m in status["members"] if m["state"] == "live"]
        return status if [(m["name"], m["shards"], m["clock"]) for m in live] == [("bravo", SHARDS, True)] else None
    wait_until(handed_over, 5.0, interval=0.1)

    # ... and alpha exits cleanly, and every task succeeds (alpha's queued ones on bravo)
    assert alpha.proc.wait(30) == 0, alpha.log()
    ran_on = results(bravo, list(ids.values()), timeout=120)
    assert "bravo" in ran_on and len(ran_on) == len(ids)
    by_tag = runs_by_tag(cluster.records)
    assert sorted(by_tag) == sorted(ids)
    assert all(runs[-1].ended for runs in by_tag.values())
    assert_no_key_ran_twice_at_once(cluster.records)


@pytest.mark.timeout(180)
def test_locked_workflow_steps_are_admitted_by_their_shards_holder(cluster):
    # Given two members that share the shards
    alpha = cluster.start("alpha")
    cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)

    # When 24 chains whose second step is locked (8 keys) are submitted through alpha
    where, then = alpha.app.tasks["where"], alpha.app.tasks["then"]
    flows = [
        cpsl.chain(where.s(0.01), then.s(f"key{k % 8}", 0.2, cluster.records, f"c{k}")).submit() for k in range(24)
    ]

    # Then every chain ends with both steps' members, the locked steps ran on both members (each
    # on its key's shard holder: one member per key), and no key ran twice at once
    results = [flow.result(timeout=120) for flow in flows]
    second = collections.Counter(r.split(">")[1] for r in results)
    assert set(second) == {"alpha", "bravo"}, results
    by_key = assert_no_key_ran_twice_at_once(cluster.records)
    assert len(by_key) == 8 and all(len({r.member for r in runs}) == 1 for runs in by_key.values())


@pytest.mark.timeout(150)
def test_a_tasks_events_stream_live_through_a_member_that_does_not_run_it(cluster):
    # Given a locked task running on bravo, submitted through alpha
    alpha = cluster.start("alpha")
    cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    ids = submit_held(cluster, [alpha], keys=24, per_key=1, seconds=2.0)
    run = wait_until(lambda: open_runs(cluster.records, "bravo"), 30, 0.05)[0]

    # When its events are followed through alpha (a long poll there)
    received = []
    for event in cpsl.TaskHandle.from_id(alpha.app, ids[run.tag]).events():
        received.append((event, time.time()))

    # Then the stream ends with its end, heard within moments of bravo writing it
    states = [e.data.get("state") for e, _ in received if e.kind == "state"]
    assert states[0] == "QUEUED" and "RUNNING" in states and states[-1] == "SUCCEEDED", states
    last, heard = received[-1]
    assert heard - last.ts < 1.5, (heard, last.ts)


@pytest.mark.timeout(150)
def test_a_task_running_on_one_member_is_cancelled_through_another(cluster):
    # Given a long process=True task running on bravo (submitted there)
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo")
    running = bravo.app.tasks["where"].submit(60.0)
    wait_until(lambda: record(bravo, running.id)["state"] == "RUNNING", 30, 0.05)
    actor = next(a["pid"] for a in cluster.status(bravo)["actors"] if a["slot"] == "p0")

    # When it is cancelled through alpha, which does not hold it
    handle = cpsl.TaskHandle.from_id(alpha.app, running.id)
    assert handle.cancel() is True

    # Then it ends CANCELLED (its result says so, through either member), bravo replaced the
    # process actor that ran it, and a second cancel finds nothing to cancel
    with pytest.raises(cpsl.TaskCancelled):
        handle.result(timeout=30)
    with pytest.raises(cpsl.TaskCancelled):
        running.result(timeout=30)
    assert record(alpha, running.id)["state"] == "CANCELLED"
    wait_until(lambda: gone([actor]), 15)
    assert handle.cancel() is False


@pytest.mark.timeout(150)
def test_session_db_updates_from_two_members_at_once_are_never_lost(cluster):
    # Given two members
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo")

    # When 120 tasks of one session, through both members (so running on both), each add one to
    # the same session.db key with compare-and-set
    session = cpsl.Session("counted")

    def send(member: Member) -> list[str]:
        count = member.app.tasks["count"].options(session=session)
        return [count.submit("n").id for _ in range(60)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ids = [task_id for part in pool.map(send, [alpha, bravo]) for task_id in part]

    # Then every one succeeded and the key counts all 120 (no update lost between the members)
    values = results(alpha, ids, timeout=120)
    assert sorted(values) == list(range(1, 121))
    assert alpha.app.session("counted").db["n"] == 120


@pytest.mark.timeout(240)
def test_a_rolling_restart_of_every_member_loses_nothing(cluster):
    # Given two members with locked and unlocked work in flight, submitted through both
    alpha = cluster.start("alpha")
    bravo = cluster.start("bravo")
    cluster.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    ids = submit_held(cluster, [alpha, bravo], keys=16, per_key=4, seconds=0.4)
    unlocked = [h.id for h in alpha.app.tasks["where"].map([0.05] * 150)]
    wait_until(lambda: open_runs(cluster.records, "alpha") or open_runs(cluster.records, "bravo"), 30, 0.05)

    # When each member in turn is stopped gracefully and started again (a new incarnation), the
    # other carrying the work meanwhile
    old = {}
    for name in ("alpha", "bravo"):
        member = cluster.members[name]
        old[name] = cluster.status(member)["member"]["id"]
        descendants = cluster.track(member)
        os.kill(member.pid, signal.SIGTERM)
        assert member.proc.wait(60) == 0, member.log()
        wait_until(lambda pids=descendants: gone(pids), 15)  # nothing of the old one is left running
        cluster.start(name)
        cluster.wait_formed("alpha", "bravo")

    # Then every task succeeded, asked through either new incarnation, and no key ran twice at once
    alpha, bravo = cluster.members["alpha"], cluster.members["bravo"]
    assert cluster.status(alpha)["member"]["id"] != old["alpha"]
    assert cluster.status(bravo)["member"]["id"] != old["bravo"]
    assert len(results(alpha, list(ids.values()), timeout=120)) == len(ids)
    assert set(results(bravo, unlocked, timeout=120)) <= {"alpha", "bravo"}
    for task_id in [*ids.values(), *unlocked]:
        assert record(alpha, task_id)["state"] == "SUCCEEDED"
    by_tag = runs_by_tag(cluster.records)
    assert sorted(by_tag) == sorted(ids) and all(runs[-1].ended for runs in by_tag.values())
    assert_no_key_ran_twice_at_once(cluster.records)


# ---- a member cut off from PostgreSQL (and from its peers) in a network namespace ----------------
@pytest.fixture
def cut_cluster() -> Iterator[tuple[Cluster, str, str, str]]:
    """A cluster whose PostgreSQL server listens on its socket and, over TCP, on the host side of a
    network namespace's link: (cluster, namespace, host-side link, a store URL over that link)."""
    from conftest import skip_or_fail
    from postgres_server import PostgresServer, binaries

    if not netns.available():
        skip_or_fail("a network namespace needs root and `ip netns` (CI runs as root)")
    if binaries() is None:
        skip_or_fail("PostgreSQL is not installed")
    root = Path(tempfile.mkdtemp(prefix="cpsl-cl-"))
    with (
        netns.namespace(f"k{os.getpid() % 10}", "9") as (ns, host_if, host_ip),
        PostgresServer(fsync=False, listen=host_ip) as pg,
    ):
        pg.create_database("capsule")
        c = Cluster(root, pg.url("capsule") + "&schema=cut")
        try:
            yield c, ns, host_if, pg.tcp_url("capsule") + "?schema=cut"
        finally:
            c.stop_all()
            for member in c.members.values():
                print(f"---- log of member {member.name} (pid {member.pid}) ----\n{member.log(8000)}")
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(240)
def test_a_member_cut_off_from_postgresql_is_taken_over_and_rejoins(cut_cluster):
    # Given two members, bravo in a network namespace that reaches PostgreSQL over its one link
    c, ns, host_if, tcp_url = cut_cluster
    alpha = c.start("alpha")
    bravo = c.start("bravo", url=tcp_url, prefix=("ip", "netns", "exec", ns))
    c.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    bravo_id = c.status(bravo)["member"]["id"]
    ids = submit_held(c, [alpha], keys=24, per_key=2, seconds=3.0)
    wait_until(lambda: open_runs(c.records, "bravo"), 30, 0.05)
    actors = [a["pid"] for a in c.status(bravo)["actors"] if a.get("pid")]

    # When bravo's link goes down (PostgreSQL, and with it every other member, out of its reach)
    subprocess.run(["ip", "link", "set", host_if, "down"], check=True, timeout=10)
    cut_at = time.time()

    # Then bravo's actors stop by themselves within its lease, alpha takes over, and every task
    # succeeds there; no key ran twice at once
    wait_until(lambda: gone(actors), LEASE + 5)
    assert time.time() - cut_at < LEASE + 5
    assert len(results(alpha, list(ids.values()), timeout=120)) == len(ids)
    assert_no_key_ran_twice_at_once(c.records)
    assert (row(c.status(alpha), bravo_id) or {}).get("state") == "lost"

    # ... and when the link is back, bravo rejoins as a new incarnation by itself
    subprocess.run(["ip", "link", "set", host_if, "up"], check=True, timeout=10)

    def rejoined() -> bool:
        status = c.try_status(bravo, timeout=10)
        return bool(status and status.get("member") and status["member"]["id"] != bravo_id)
    wait_until(rejoined, 90, interval=0.5)
    assert bravo.proc.poll() is None
    for task_id in ids.values():  # its late writes changed nothing
        assert record(alpha, task_id)["state"] == "SUCCEEDED"
