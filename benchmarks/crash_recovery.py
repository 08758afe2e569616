"""Crash recovery under load: SIGKILL process-isolated actors that are running a task, many times.

    /work/venv/bin/python benchmarks/crash_recovery.py [--kills 200] [--lanes 4] [--poll-ms 2]
                                                       [--compare celery,dramatiq] [--peer-kills 20]

The runtime has ``process_workers=2`` (and one worker actor, which this benchmark does not use).
``--lanes`` threads (default 4) each submit one ``process=True`` task with ``retries=3`` at a
time and wait for its result, so both process actors are always busy and two tasks wait in the
queue. Each task sleeps 20-50 ms and returns its input; its body appends a start line and an
end line (input, pid, CLOCK_MONOTONIC time) to a per-run file, which counts how many times each
body ran.

A killer loop, ``--kills`` times (default 200): reads ``rt.status()["actors"]`` for a process
actor that is ready and running a task, finds that task among the lanes' in-flight handles
(``h.info()``: state RUNNING on that slot, with a retry left) whose body has started in that
actor's pid with at least 8 ms of its sleep left (the run file), and SIGKILLs the actor's pid.
Then it measures, from the kill:

  new pid       until ``status()`` shows the slot with another pid (the replacement exists);
  ready         until that slot's new pid is in state "ready" (it has said hello and has the
                registry): the slot can run tasks again. Polled every ``--poll-ms`` (default 2).
  first task    until the replacement's first task body started (from the run file);
  result        until the killed task's ``result()`` returned in its lane (it was retried:
                on the other actor if that one got free first, else on the replacement).

and then kills again. At the end: every submitted task must have SUCCEEDED (``tasks lost`` is
the number that did not, and must be 0), and ``extra runs`` counts task bodies that started
more often than once plus once per kill that interrupted them (must be 0). Retries are
immediate (``Backoff(initial=0)``), as Celery redelivers a rejected message at once; with
``--default-backoff`` the task uses the default backoff, which adds 0.25-0.5 s to ``result``.

The restart intensity limit is raised (``max_restarts=1_000_000``): at the default (10 restarts
per slot in 60 s) the supervisor backs a slot off exponentially after the 11th kill, by design.

``--compare celery,dramatiq`` runs the same scenario on those peers when they are importable and
``redis-server`` is on PATH. The script starts ``redis-server --port <free> --save ''
--appendonly no`` on 127.0.0.1 and stops it by pid at the end. The peer's worker is a subprocess
(its own session), stopped with its whole process tree in ``finally``:

  Celery    ``celery worker --pool prefork --concurrency 2``, Redis broker and result backend,
            ``task_acks_late=True``, ``task_reject_on_worker_lost=True`` (otherwise defaults).
  Dramatiq  ``dramatiq --processes 2 --threads 1``, RedisBroker, Results middleware on Redis,
            ``max_retries=3``. Dramatiq's main process shuts the whole worker down when one of
            its processes dies; the script restarts it at once, as a service manager would
            (systemd ``Restart=always``, ``RestartSec=0``).

For a peer, the killer finds a child worker process that is running a task (from the run file),
SIGKILLs it, and measures until a new worker process exists (psutil, among the children of the
peer's main process), until a new process started its first task, and until the killed task's
result arrived (``--peer-timeout``, default 30 s; else "timeout"). ``--peer-kills`` (default 20)
kills per peer; a peer is abandoned after ``--peer-give-up`` (default 2) timeouts in a row. At
the end, results still missing get ``--peer-drain`` (default 120 s) more to arrive; ``lost``
counts those that never did.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common, when this file is imported rather than run
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

from _common import Deadline, RedisServer, Watchdog, print_machine, print_package, stats_ms, stop_tree, temp_dir  # noqa: E402

import capsule_actors as cpsl  # noqa: E402

RUNS_ENV = "CPSL_BENCH_RUNS_FILE"
RETRIES = 3
MARGIN = 0.008  # a victim must have at least this much of its sleep left when it is picked

app = cpsl.App("bench-crash", grace=2.0, max_restarts=1_000_000, restart_window=60.0)


def sleep_for(i: int) -> float:
    """Task ``i`` sleeps 20-50 ms, fixed per input."""
    return (20 + (i * 7919) % 31) / 1000.0


def _mark(kind: str, i: int, extra: float = 0.0) -> None:
    line = f"{kind} {i} {os.getpid()} {time.monotonic():.6f} {extra:.4f}\n"
    fd = os.open(os.environ[RUNS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one O_APPEND write: lines never interleave
    finally:
        os.close(fd)


def body(i: int, sleep_s: float) -> int:
    _mark("S", i, sleep_s)
    time.sleep(sleep_s)
    _mark("E", i)
    return i


@app.task(process=True, retries=RETRIES, backoff=cpsl.Backoff(initial=0.0, factor=1.0, max=0.0, jitter=False))
def work(i: int, sleep_s: float) -> int:
    return body(i, sleep_s)


@app.task(process=True, retries=RETRIES, name="work_default_backoff")
def work_default_backoff(i: int, sleep_s: float) -> int:
    return body(i, sleep_s)


# ---- the run file: which task each process is running, how often each body started ------------


class RunFile:
    """Reads the run file incrementally: open task per pid, starts per input, first start per pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.open: dict[int, tuple[int, float, float]] = {}  # pid -> (input, start, sleep)
        self.starts: Counter[int] = Counter()
        self.first_start: dict[int, float] = {}  # pid -> monotonic time of its first task

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            kind, i, pid, ts, extra = line.split()
            if kind == b"S":
                self.open[int(pid)] = (int(i), float(ts), float(extra))
                self.starts[int(i)] += 1
                self.first_start.setdefault(int(pid), float(ts))
            else:
                self.open.pop(int(pid), None)


# ---- the load: lanes that each keep one task in flight -------------------------------------------


@dataclass
class Flight:
    i: int
    handle: Any
    sleep_s: float
    submitted: float
    done: threading.Event = field(default_factory=threading.Event)
    finished: float | None = None
    outcome: str = "pending"


class Load:
    """``lanes`` threads; each submits a task, waits for its result (``timeout``), repeats."""

    def __init__(self, submit: Callable[[int, float], Any], wait: Callable[[Any, float], Any],
                 lanes: int, timeout: float) -> None:
        self.submit, self.wait, self.timeout = submit, wait, timeout
        self.counter = itertools.count()
        self.flights: dict[int, Flight] = {}
        self.current: dict[int, Flight] = {}  # lane -> its task in flight
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._lane, args=(n,), daemon=True) for n in range(lanes)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def _lane(self, lane: int) -> None:
        while not self.stopping.is_set():
            i = next(self.counter)
            s = sleep_for(i)
            try:
                flight = Flight(i, None, s, time.monotonic())
                self.flights[i] = flight
                flight.handle = self.submit(i, s)
            except Exception as exc:  # a submit that fails is reported, and the lane stops
                flight.outcome = f"submit failed: {type(exc).__name__}: {exc}"
                self.errors.append(flight.outcome)
                flight.done.set()
                return
            self.current[lane] = flight
            try:
                value = self.wait(flight.handle, self.timeout)
                flight.outcome = "ok" if value == i else f"wrong value {value!r}"
            except TimeoutError:
                flight.outcome = "timeout"
            except Exception as exc:
                flight.outcome = f"{type(exc).__name__}: {exc}"[:200]
            flight.finished = time.monotonic()
            flight.done.set()
            self.current.pop(lane, None)

    def in_flight(self) -> list[Flight]:
        return list(self.current.values())

    def stop(self, deadline: Deadline) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(max(0.1, deadline.left()))


@dataclass
class Kill:
    victim: int | None
    pid: int
    t_kill: float
    t_new: float | None = None  # a new process exists
    t_ready: float | None = None  # capsule: the slot's new actor is ready
    new_pids: tuple[int, ...] = ()
    t_result: float | None = None
    outcome: str = "pending"
    attempts_before: int | None = None
    hit: bool | None = None  # the victim's attempt was interrupted (confirmed afterwards)


@dataclass
class Outcome:
    system: str
    kills: list[Kill]
    flights: dict[int, Flight]
    runs: RunFile
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---- capsule_actors ----------------------------------------------------------------------------


def _pick_capsule_victim(rt: cpsl.Runtime, load: Load, runs: RunFile, deadline: Deadline
                         ) -> tuple[dict[str, Any], Flight, int]:
    """A ready process actor running a task of ours: RUNNING on its slot with a retry left
    (``h.info()``), its body started in that actor's pid and with time left (the run file)."""
    while True:
        deadline.left()
        actors = {a["slot"]: a for a in rt.status()["actors"]
                  if a["role"] == "process" and a["state"] == "ready" and a["running"] > 0}
        runs.poll()
        for flight in load.in_flight():
            if not actors:
                break
            info = flight.handle.info()
            actor = actors.get(info.slot or "")
            if actor is None or info.state != cpsl.TaskState.RUNNING or info.attempts > RETRIES:
                continue
            body = runs.open.get(actor["pid"])
            if body is not None and body[0] == flight.i and body[1] + body[2] - time.monotonic() >= MARGIN:
                return actor, flight, info.attempts
        time.sleep(0.001)


def _wait_replacement(rt: cpsl.Runtime, kill: Kill, slot: str, poll: float, deadline: Deadline,
                      status_lat: list[float]) -> None:
    while kill.t_ready is None:
        s = time.monotonic()
        actor = next(a for a in rt.status()["actors"] if a["slot"] == slot)
        now = time.monotonic()
        status_lat.append(now - s)
        if actor["pid"] is not None and actor["pid"] != kill.pid:
            if kill.t_new is None:
                kill.t_new = now
                kill.new_pids = (actor["pid"],)
            if actor["state"] == "ready":
                kill.t_ready = now
                return
        deadline.left()
        time.sleep(poll)


def run_capsule(args: argparse.Namespace, tmp: Path, dog: Watchdog) -> Outcome:
    runs_path = tmp / "capsule-runs.txt"
    os.environ[RUNS_ENV] = str(runs_path)  # the actors inherit it through the supervisor
    task = work_default_backoff if args.default_backoff else work
    runs = RunFile(runs_path)
    kills: list[Kill] = []
    status_lat: list[float] = []
    runtime = app.start(state_dir=tmp / "s", workers=1, process_workers=2)
    dog.on_expire(runtime.stop)
    with runtime as rt:
        for h in task.map([(-1 - n, 0.0) for n in range(8)]):  # warm: both actors, every code path
            h.result(timeout=30)
        load = Load(lambda i, s: task.submit(i, s), lambda h, t: h.result(timeout=t), args.lanes, 60.0).start()
        deadline = Deadline(args.budget, "capsule_actors kills")
        try:
            for n in range(args.kills):
                actor, victim, attempts = _pick_capsule_victim(rt, load, runs, deadline)
                os.kill(actor["pid"], signal.SIGKILL)
                kill = Kill(victim.i, actor["pid"], time.monotonic(), attempts_before=attempts)
                kills.append(kill)
                _wait_replacement(rt, kill, actor["slot"], args.poll_ms / 1000.0, deadline, status_lat)
                if victim.done.wait(min(30.0, deadline.left())):
                    kill.t_result, kill.outcome = victim.finished, victim.outcome
                else:
                    kill.outcome = "timeout"
                if args.progress and (n + 1) % 50 == 0:
                    print(f"  capsule_actors: {n + 1} kills", file=sys.stderr, flush=True)
        finally:
            load.stop(Deadline(90.0, "capsule_actors: the lanes' last tasks"))
        tries = {i: f.handle.info().attempts for i, f in load.flights.items() if f.handle is not None}
        restarts = {a["slot"]: a["restarts"] for a in rt.status()["actors"] if a["role"] == "process"}
    for kill in kills:
        assert kill.victim is not None and kill.attempts_before is not None
        kill.hit = tries.get(kill.victim, 0) > kill.attempts_before
    runs.poll()
    retries = sum(a - 1 for a in tries.values())
    return Outcome("capsule_actors", kills, load.flights, runs, extra={
        "attempts": tries, "retries": retries, "restarts": restarts, "status_lat": status_lat,
        "lane_errors": load.errors})


# ---- the peers ------------------------------------------------------------------------------------

PEER_MODULE = '''
"""Written by benchmarks/crash_recovery.py: the same task for Celery and Dramatiq."""
import os
import time

RUNS = os.environ["CPSL_BENCH_RUNS_FILE"]
REDIS = os.environ["CPSL_BENCH_REDIS"]


def _mark(kind, i, extra=0.0):
    line = f"{kind} {i} {os.getpid()} {time.monotonic():.6f} {extra:.4f}\\n"
    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def body(i, sleep_s):
    _mark("S", i, sleep_s)
    time.sleep(sleep_s)
    _mark("E", i)
    return i


if os.environ["CPSL_BENCH_PEER"] == "celery":
    from celery import Celery

    capp = Celery("cpsl_peer_tasks", broker=REDIS, backend=REDIS)
    capp.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, broker_connection_retry_on_startup=True)

    @capp.task(name="work")
    def work(i, sleep_s):
        return body(i, sleep_s)
else:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    backend = RedisBackend(url=REDIS)
    broker = RedisBroker(url=REDIS)
    broker.add_middleware(Results(backend=backend))
    dramatiq.set_broker(broker)

    @dramatiq.actor(store_results=True, max_retries=3)
    def work(i, sleep_s):
        return body(i, sleep_s)
'''


class PeerWorker:
    """The peer's worker command in its own session; restarted when it exits if ``restart``."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, restart: bool) -> None:
        self.cmd, self.env, self.log, self.restart = cmd, env, log, restart
        self.proc: subprocess.Popen[bytes] | None = None
        self.all: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> PeerWorker:
        self._spawn()
        if self.restart:
            self.watcher.start()
        return self

    def _spawn(self) -> None:
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        with self.lock:
            self.proc = proc
            self.all.append(proc)

    def _watch(self) -> None:
        while not self.closing.wait(0.002):
            proc = self.proc
            if proc is not None and proc.poll() is not None and not self.closing.is_set():
                self.restarts += 1
                self._spawn()

    def children(self) -> list[int]:
        import psutil

        proc = self.proc
        if proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def close(self) -> None:
        self.closing.set()
        if self.watcher.is_alive():
            self.watcher.join(2)
        for proc in self.all:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.all:
            stop_tree(proc, grace=3.0)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def peer_available(name: str) -> str | None:
    """None when the peer can run here, else why not."""
    mod = {"celery": "celery", "dramatiq": "dramatiq"}.get(name)
    if mod is None:
        return f"unknown peer {name!r} (known: celery, dramatiq)"
    missing = [m for m in (mod, "redis") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not importable: {', '.join(missing)}"
    if not RedisServer.available():
        return "redis-server is not on PATH"
    return None


def _peer_setup(name: str, tmp: Path, redis: RedisServer) -> tuple[Any, Callable[..., Any], Callable[..., Any],
                                                                   list[str], dict[str, str], Path]:
    """Write the peer's task module; import it here; return (module, submit, wait, cmd, env, runs)."""
    pdir = tmp / f"peer-{name}"
    pdir.mkdir()
    (pdir / "cpsl_peer_tasks.py").write_text(PEER_MODULE)
    runs_path = pdir / "runs.txt"
    env = dict(os.environ, CPSL_BENCH_RUNS_FILE=str(runs_path), CPSL_BENCH_REDIS=redis.url, CPSL_BENCH_PEER=name,
               PYTHONPATH=os.pathsep.join([str(pdir), *(p for p in sys.path if p)]))
    os.environ.update(CPSL_BENCH_RUNS_FILE=str(runs_path), CPSL_BENCH_REDIS=redis.url, CPSL_BENCH_PEER=name)
    sys.path.insert(0, str(pdir))
    sys.modules.pop("cpsl_peer_tasks", None)
    import cpsl_peer_tasks as mod  # type: ignore[import-not-found]

    bindir = Path(sys.executable).parent
    if name == "celery":
        cmd = [str(bindir / "celery"), "-A", "cpsl_peer_tasks", "worker", "--pool", "prefork", "--concurrency", "2",
               "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "-n", f"bench{os.getpid()}@%h"]

        def submit(i: int, s: float) -> Any:
            return mod.work.delay(i, s)

        def wait(h: Any, timeout: float) -> Any:
            try:
                return h.get(timeout=timeout, interval=0.005)
            except Exception as exc:
                if type(exc).__name__ == "TimeoutError":
                    raise TimeoutError(str(exc)) from None
                raise
    else:
        cmd = [str(bindir / "dramatiq"), "cpsl_peer_tasks", "--processes", "2", "--threads", "1"]

        def submit(i: int, s: float) -> Any:
            return mod.work.send(i, s)

        def wait(h: Any, timeout: float) -> Any:
            """Blocks of 1 s (the backend's resolution) until ``timeout``; a redis socket
            timeout inside a block is retried like an empty block."""
            import redis
            from dramatiq.results import ResultTimeout

            end = time.monotonic() + timeout
            while True:
                try:
                    return h.get_result(backend=mod.backend, block=True, timeout=1000)
                except (ResultTimeout, redis.exceptions.TimeoutError):
                    if time.monotonic() >= end:
                        raise TimeoutError(f"no result within {timeout} s") from None
    return mod, submit, wait, cmd, env, runs_path


def _pick_peer_victim(worker: PeerWorker, runs: RunFile, deadline: Deadline) -> tuple[int, int, list[int]]:
    """(pid, task input, the worker processes before the kill) for a process running a task."""
    while True:
        deadline.left()
        kids = worker.children()
        runs.poll()
        if len(kids) >= 2:
            now = time.monotonic()
            for pid in kids:
                task = runs.open.get(pid)
                if task is not None and task[1] + task[2] - now >= MARGIN:
                    return pid, task[0], kids
        time.sleep(0.001)


def run_peer(name: str, args: argparse.Namespace, tmp: Path, dog: Watchdog) -> Outcome:
    kills: list[Kill] = []
    note = ""
    with RedisServer() as redis:
        dog.on_expire(redis.stop)
        mod, submit, wait, cmd, env, runs_path = _peer_setup(name, tmp, redis)
        runs = RunFile(runs_path)
        worker = PeerWorker(cmd, env, runs_path.with_name("worker.log"), restart=(name == "dramatiq"))
        dog.on_expire(worker.close)
        load: Load | None = None
        try:
            worker.start()
            warm = Deadline(60.0, f"{name}: starting the worker")
            for h in [submit(-1 - n, 0.0) for n in range(8)]:
                wait(h, warm.left())
            load = Load(submit, wait, args.lanes, args.peer_timeout).start()
            deadline = Deadline(args.peer_budget, f"{name} kills")
            timeouts_in_a_row = 0
            for _ in range(args.peer_kills):
                pid, victim_i, before = _pick_peer_victim(worker, runs, deadline)
                victim = load.flights[victim_i]
                os.kill(pid, signal.SIGKILL)
                kill = Kill(victim_i, pid, time.monotonic())
                kills.append(kill)
                _wait_new_child(worker, kill, set(before), args.poll_ms / 1000.0, deadline)
                if victim.done.wait(args.peer_timeout + 1.0):
                    kill.t_result, kill.outcome = victim.finished, victim.outcome
                else:
                    kill.outcome = "timeout"
                if victim.outcome == "pending":
                    kill.outcome = "timeout"
                timeouts_in_a_row = timeouts_in_a_row + 1 if kill.outcome != "ok" else 0
                if timeouts_in_a_row >= args.peer_give_up:
                    note = f"stopped after {timeouts_in_a_row} kills in a row whose task never came back"
                    break
        except TimeoutError as exc:
            note = str(exc)
        finally:
            if load is not None:
                load.stop(Deadline(args.peer_timeout + 5.0, f"{name}: the lanes' last tasks"))
            late = _late_results(load, wait, args.peer_drain) if load is not None else {}
            restarts = worker.restarts
            worker.close()
    runs.poll()
    return Outcome(name, kills, load.flights if load else {}, runs, note=note,
                   extra={"late": late, "restarts": restarts, "module": mod.__name__})


def _wait_new_child(worker: PeerWorker, kill: Kill, before: set[int], poll: float, deadline: Deadline) -> None:
    """Until a worker process exists that was not there before the kill (deadline: 30 s)."""
    limit = time.monotonic() + 30.0
    while time.monotonic() < limit:
        new = [p for p in worker.children() if p not in before]
        if new:
            kill.t_new = time.monotonic()
            kill.new_pids = tuple(new)
            return
        deadline.left()
        time.sleep(poll)


def _late_results(load: Load, wait: Callable[[Any, float], Any], budget: float) -> dict[int, tuple[str, float]]:
    """Tasks whose lane did not get their result: did it arrive by the end, and when? One budget
    for all of them (``--peer-drain``)."""
    deadline = time.monotonic() + budget
    late = {}
    for i, flight in load.flights.items():
        if flight.outcome != "ok" and flight.handle is not None:
            try:
                value = wait(flight.handle, max(0.05, deadline - time.monotonic()))
                late[i] = ("ok" if value == i else f"wrong value {value!r}", time.monotonic())
            except TimeoutError:
                late[i] = ("never", time.monotonic())
            except Exception as exc:
                late[i] = (type(exc).__name__, time.monotonic())
    return late


# ---- report --------------------------------------------------------------------------------------


def summarize(out: Outcome) -> dict[str, Any]:
    kills = out.kills
    since = {
        "new": [k.t_new - k.t_kill for k in kills if k.t_new is not None],
        "ready": [k.t_ready - k.t_kill for k in kills if k.t_ready is not None],
        "first": [first - k.t_kill for k in kills
                  if (first := min((out.runs.first_start[p] for p in k.new_pids if p in out.runs.first_start),
                                   default=None)) is not None and first >= k.t_kill],
        "result": [k.t_result - k.t_kill for k in kills if k.outcome == "ok" and k.t_result is not None
                   and k.hit is not False],
    }
    late = out.extra.get("late", {})
    submitted = [f for f in out.flights.values() if f.handle is not None and f.i >= 0]
    not_ok = [f for f in submitted if f.outcome != "ok" and late.get(f.i, ("",))[0] != "ok"]
    came_back = [late[k.victim][1] - k.t_kill for k in kills
                 if k.outcome != "ok" and k.victim in late and late[k.victim][0] == "ok"]
    # Each kill that landed on a running body allows that body one more start.
    killed_on = Counter(k.victim for k in kills if k.victim is not None and k.hit is not False)
    extra_runs = sum(max(0, n - 1 - killed_on.get(i, 0)) for i, n in out.runs.starts.items() if i >= 0)
    outcomes = Counter(k.outcome if k.outcome in ("ok", "timeout") else "error" for k in kills)
    return {"since": since, "submitted": len(submitted), "lost": len(not_ok), "extra_runs": extra_runs,
            "came_back": came_back,
            "outcomes": outcomes, "not_ok": not_ok, "missed": sum(1 for k in kills if k.hit is False)}


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p99, mx = stats_ms(values)
    return f"{p50:.0f} / {p99:.0f} / {mx:.0f}"


def report(results: list[Outcome], args: argparse.Namespace) -> bool:
    print()
    header = (f"{'system':<15} {'kills':>5}  {'new process ms':>16}  {'ready ms':>16}  {'first task ms':>16}  "
              f"{'killed task result ms':>21}  {'results ok/timeout/err':>22}  {'tasks':>6}  {'lost':>4}  "
              f"{'extra runs':>10}")
    print("p50 / p99 / max, from the SIGKILL")
    print(header)
    print("-" * len(header))
    ok = True
    for out in results:
        s = summarize(out)
        c = s["outcomes"]
        print(f"{out.system:<15} {len(out.kills):>5}  {fmt(s['since']['new']):>16}  {fmt(s['since']['ready']):>16}  "
              f"{fmt(s['since']['first']):>16}  {fmt(s['since']['result']):>21}  "
              f"{c['ok']:>8}/{c['timeout']}/{c['error']:<6}  {s['submitted']:>6}  {s['lost']:>4}  "
              f"{s['extra_runs']:>10}")
        if out.system == "capsule_actors":
            ok = ok and s["lost"] == 0 and s["extra_runs"] == 0 and len(out.kills) == args.kills
        s["out"] = out
        out.extra["summary"] = s
    print()
    for out in results:
        s = out.extra["summary"]
        if out.system == "capsule_actors":
            lat = out.extra["status_lat"]
            print(f"capsule_actors: {s['missed']} of {len(out.kills)} kills hit an actor whose task had just "
                  f"ended (excluded from 'killed task result'); retries in the store {out.extra['retries']}; "
                  f"restarts per slot {out.extra['restarts']}; status() round trip p50 "
                  f"{stats_ms(lat)[0]:.2f} ms, p99 {stats_ms(lat)[1]:.2f} ms while polling")
            if out.extra["lane_errors"]:
                print(f"  lane errors: {out.extra['lane_errors'][:3]}")
        else:
            late = Counter(v[0] for v in out.extra["late"].values())
            back = s["came_back"]
            print(f"{out.system}: worker restarts by the script {out.extra['restarts']}; tasks whose lane "
                  f"got no result: {sum(late.values())} (waited for again at the end: {dict(late) or 'n/a'})"
                  + (f"; killed tasks that came back late: {len(back)}, {min(back):.1f}-{max(back):.1f} s "
                     "after the kill" if back else "") + (f"; {out.note}" if out.note else ""))
        for f in s["not_ok"][:5]:
            print(f"  not ok: task {f.i}: {f.outcome}")
    print("\nnew process: capsule_actors = the slot shows a new pid in status(); peers = a new child of the "
          "worker's main process.\nready: the new actor said hello (capsule_actors only). first task: the "
          "new process started a task body.\nlost = submitted and never succeeded; extra runs = body starts "
          "beyond one per task plus one per kill that interrupted it.")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs of capsule_actors process actors (200)")
    parser.add_argument("--lanes", type=int, default=4, help="tasks kept in flight (default 4)")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="status/psutil poll interval after a kill (2)")
    parser.add_argument("--default-backoff", action="store_true",
                        help="retry with the task's default Backoff instead of at once")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds allowed for the kills (default 150)")
    parser.add_argument("--compare", default="", help="comma-separated peers: celery,dramatiq")
    parser.add_argument("--peer-kills", type=int, default=20, help="SIGKILLs per peer (default 20)")
    parser.add_argument("--peer-timeout", type=float, default=30.0,
                        help="seconds to wait for a peer's killed task (default 30)")
    parser.add_argument("--peer-give-up", type=int, default=2,
                        help="abandon a peer after this many timeouts in a row (default 2)")
    parser.add_argument("--peer-drain", type=float, default=120.0,
                        help="seconds, at the end, for a peer's missing results to come back (default 120)")
    parser.add_argument("--peer-budget", type=float, default=240.0, help="seconds allowed per peer (default 240)")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr")
    parser.add_argument("--verbose", action="store_true",
                        help="keep the supervisor's warning per restart (CAPSULE_LOG_LEVEL=ERROR otherwise)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.lanes < 2 or args.poll_ms <= 0:
        parser.error("--kills >= 1, --lanes >= 2 and --poll-ms > 0")
    if not args.verbose:
        os.environ.setdefault("CAPSULE_LOG_LEVEL", "ERROR")  # one warning per restart otherwise
    peers = [p.strip() for p in args.compare.split(",") if p.strip()]
    hard = args.budget + 120.0 + len(peers) * (args.peer_budget + args.peer_timeout + args.peer_drain + 60.0)

    print(f"capsule_actors {cpsl.__version__} crash recovery: {args.kills} SIGKILLs of process actors under load, "
          f"process_workers=2, {args.lanes} tasks in flight, process=True tasks of 20-50 ms with retries={RETRIES}, "
          f"{'default backoff' if args.default_backoff else 'immediate retry'}")
    print_package(Path(cpsl.__file__).parent)
    print_machine()
    started = time.monotonic()
    results: list[Outcome] = []
    skipped: list[str] = []
    with Watchdog(hard, "crash_recovery.py") as dog, temp_dir() as tmp:
        results.append(run_capsule(args, tmp, dog))
        for peer in peers:
            why = peer_available(peer)
            if why:
                skipped.append(f"{peer}: skipped ({why})")
                continue
            version = importlib.import_module(peer).__version__
            print(f"{peer} {version}: starting", file=sys.stderr, flush=True)
            results.append(run_peer(peer, args, tmp, dog))
            results[-1].system = f"{peer} {version}"
    ok = report(results, args)
    for line in skipped:
        print(line)
    print(f"\ntotal wall time {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:  # a phase ran past its deadline; everything was stopped
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        sys.exit(2)
