"""Chaos: thousands of tasks while actors and the supervisor itself are SIGKILLed.

A service (``capsule-actors run chaosapp_*:app --state-dir DIR``, a subprocess) runs a mix of
tasks submitted from this process: async no-ops, ``process=True`` no-ops, locked tasks
(``lock="k:{key}"`` async and ``lock="pk:{key}"`` process, ~20 keys each, ``on_conflict="queue"``
so that every one of them runs, one at a time per key) and delayed ones (``.schedule(delay=0..2 s)``).
Every task has ``retries=5`` and an immediate retry. A small share of the acknowledged tasks is
cancelled right after the submit.

While the tasks are submitted (paced over ``--submit-seconds``) a killer thread SIGKILLs a random
actor (worker, process or clock; never the template) every 50-200 ms, and the supervisor itself
is SIGKILLed and started again ``--supervisor-kills`` times (2). Submits that fail because the
supervisor is down are sent again (with new task ids: only the handles a submit returned count
as acknowledged).

Afterwards, with the killer stopped, it waits for every acknowledged task, stops the service
gracefully and checks, reading ``capsule.db`` with sqlite3:

* every acknowledged id has its row, in a terminal state that matches what ``result()`` said;
  a success returned the right value, a failure is ``WorkerCrashed`` (retries spent), a task whose
  ``cancel()`` returned True is CANCELLED;
* no row at all is QUEUED, SCHEDULED or RUNNING;
* no lock key ever ran two bodies at once: each locked body appends ``S``/``E`` lines (O_APPEND)
  with its start and end times, and the intervals of one key never overlap; each body also takes
  a non-blocking ``flock`` on a per-key file, so an overlap with a body that was killed before
  it wrote its end line is caught too (the kernel drops the flock when the process dies);
* no orphan process: nothing that carries this run's environment tag (every process the
  supervisors started inherits it) is alive after each supervisor kill and after the stop;
* ``PRAGMA integrity_check`` is ``ok``.

It prints the counts and exits 1 when a check fails (2 when it runs over its hard limit); the
work directory (state dir, supervisor logs, intervals.log, failures.txt) is kept on failure.
A run that stops making progress (no submit acknowledged, or no task finished, for
``--stall-timeout`` seconds) fails with what the supervisor believes about its actors.
``tests/test_chaos.py`` runs a short version of the same code.

    /work/venv/bin/python benchmarks/chaos.py [--tasks 5000] [--seed 0] [--keep]

Harder variants: ``--kill-ms 5,30`` (kill more often), ``--burst 2`` (two actors a few ms apart
per tick), ``--supervisor-kills 5``, ``--downtime 7`` (the supervisor stays down past the 5 s
after which a waiting submit raises NotRunning), ``--submit-seconds 1 --tail 15`` (a burst of
submits, kills while the backlog drains).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import capsule_actors as cpsl  # noqa: E402
from capsule_actors import messages  # noqa: E402
from capsule_actors.client import Client  # noqa: E402
from capsule_actors.transport import read_runtime_file  # noqa: E402

TAG_ENV = "CAPSULE_CHAOS_TAG"
LIVE = ("QUEUED", "SCHEDULED", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

APP_SOURCE = textwrap.dedent('''
    """Tasks of one chaos run (written by benchmarks/chaos.py)."""
    import asyncio
    import fcntl
    import os
    import random
    import time
    import uuid

    import capsule_actors as cpsl

    STATE_DIR = {state_dir!r}
    LOCK_DIR = {lock_dir!r}
    LOCK_LOG = os.path.join(LOCK_DIR, "intervals.log")

    app = cpsl.App("chaos", state_dir=STATE_DIR, workers={workers}, process_workers={process_workers},
                   max_restarts=10000, grace=5.0)
    RETRY = dict(retries={retries}, backoff=cpsl.Backoff(initial=0.0, jitter=False))


    def _line(text):
        fd = os.open(LOCK_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (text + "\\n").encode())  # one write(2) per line: O_APPEND keeps it whole
        finally:
            os.close(fd)


    class _Held:
        """Marks one locked body: an S line, a non-blocking flock on the key's file, an E line."""

        def __init__(self, key, i):
            self.key, self.i, self.token = key, i, uuid.uuid4().hex

        def __enter__(self):
            self.fd = os.open(os.path.join(LOCK_DIR, self.key.replace(":", "_") + ".flock"),
                              os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another body of this key is alive right now
                _line(f"O {{self.key}} {{self.i}} {{self.token}} {{os.getpid()}} {{time.time():.6f}}")
            _line(f"S {{self.key}} {{self.i}} {{self.token}} {{os.getpid()}} {{time.time():.6f}}")
            return self

        def __exit__(self, *exc):
            _line(f"E {{self.key}} {{self.i}} {{self.token}} {{os.getpid()}} {{time.time():.6f}}")
            os.close(self.fd)  # drops the flock (so does the death of the process)


    @app.task(**RETRY)
    async def anoop(i):
        await asyncio.sleep(random.random() * 0.02)
        return i


    @app.task(process=True, **RETRY)
    def pnoop(i):
        time.sleep(random.random() * 0.01)
        return i


    @app.task(lock="k:{{key}}", on_conflict="queue", **RETRY)
    async def locked(key, i):
        with _Held(f"k:{{key}}", i):
            await asyncio.sleep(0.001 + random.random() * 0.009)
        return i


    @app.task(process=True, lock="pk:{{key}}", on_conflict="queue", **RETRY)
    def plocked(key, i):
        with _Held(f"pk:{{key}}", i):
            time.sleep(0.001 + random.random() * 0.009)
        return i
''')

# share of each kind of submit; "delayed" is a .schedule(delay=) of one of the other kinds
MIX = (("async", 0.30), ("process", 0.18), ("locked", 0.18), ("plocked", 0.10), ("delayed", 0.20),
       ("delayed_locked", 0.04))


@dataclasses.dataclass
class Config:
    tasks: int = 5000
    seed: int = 0
    keys: int = 20
    workers: int = 2
    process_workers: int = 2
    retries: int = 5
    kill_every: tuple[float, float] = (0.05, 0.2)
    burst: int = 1  # actors killed per tick, 0-4 ms apart
    supervisor_kills: int = 2
    submit_seconds: float | None = None  # default: tasks / 100
    batch: int = 20
    cancel_share: float = 0.02
    max_delay: float = 2.0
    tail: float = 2.0  # actor kills go on this long after the last submit
    drain_timeout: float = 300.0
    stall_timeout: float = 60.0  # no submit acknowledged / no task finished for this long: give up
    start_timeout: float = 60.0
    orphan_timeout: float = 10.0
    downtime: float = 0.0  # extra seconds the supervisor stays down after each SIGKILL
    log: Callable[[str], None] = print

    def pace(self) -> float:
        return self.submit_seconds if self.submit_seconds is not None else self.tasks / 100.0


@dataclasses.dataclass
class Report:
    submitted: int = 0  # submit items sent (including those sent again after a failed submit)
    acknowledged: int = 0
    submit_errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    succeeded: int = 0
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    cancelled: int = 0
    cancel_requests: int = 0
    cancel_true: int = 0
    actor_kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    supervisor_restarts: int = 0
    max_attempts: int = 0
    retried_tasks: int = 0
    rows: int = 0
    unacknowledged_rows: int = 0
    ran_twice: int = 0  # plan items recorded under two ids: a submit that raised was recorded anyway
    locked_bodies: int = 0
    killed_bodies: int = 0
    restarts_reported: int = 0
    integrity: str = ""
    elapsed: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def lines(self) -> list[str]:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.actor_kills.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.submit_errors.items())) or "none"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return [
            f"submitted        {self.submitted} submit items sent (failed submits: {errors})",
            f"acknowledged     {self.acknowledged} ({kinds})",
            f"succeeded        {self.succeeded}",
            f"failed           {sum(self.failed.values())} ({failed})",
            f"cancelled        {self.cancelled} (cancel() called {self.cancel_requests}, returned True "
            f"{self.cancel_true})",
            f"actor kills      {sum(self.actor_kills.values())} ({kills}); actor restarts reported "
            f"by the last supervisor {self.restarts_reported}",
            f"supervisor       {self.supervisor_restarts} SIGKILLs + restarts",
            f"attempts         max {self.max_attempts}; {self.retried_tasks} tasks ran more than once",
            f"rows             {self.rows} in capsule.db ({self.unacknowledged_rows} never acknowledged; "
            f"{self.ran_twice} of those are items that were also acknowledged when sent again)",
            f"locked bodies    {self.locked_bodies} started, {self.killed_bodies} killed before their end",
            f"integrity_check  {self.integrity}",
            f"wall time        {self.elapsed:.1f} s",
        ]


@dataclasses.dataclass
class Sent:
    kind: str
    expected: int
    handle: cpsl.TaskHandle
    cancelled: bool = False  # cancel() returned True


# ---- processes ------------------------------------------------------------------------------------


def tagged(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries this run's tag (started by our supervisors)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def kill_tagged(tag: str) -> None:
    for proc in tagged(tag):
        with contextlib.suppress(psutil.Error):
            proc.kill()


class Service:
    """``capsule-actors run`` as a subprocess; every start and SIGKILL goes through here."""

    def __init__(self, workdir: Path, module: str, state_dir: Path, tag: str, cfg: Config) -> None:
        self.workdir, self.module, self.state_dir, self.tag, self.cfg = workdir, module, state_dir, tag, cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.workdir), str(REPO_ROOT)]))
        env[TAG_ENV] = self.tag
        env.setdefault("CAPSULE_LOG_LEVEL", "WARNING")
        log = open(self.workdir / f"supervisor-{len(self.started)}.log", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen([sys.executable, "-m", "capsule_actors", "run", f"{self.module}:app",
                                     "--state-dir", str(self.state_dir)], cwd=self.workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.started.append(proc)
        self.proc = proc
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            info = read_runtime_file(self.state_dir)
            if info is not None and info.pid == proc.pid:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"supervisor exited with {proc.returncode} at start; see "
                                   f"{self.workdir}/supervisor-{len(self.started) - 1}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisor did not start within {self.cfg.start_timeout} s")
            time.sleep(0.02)

    def sigkill(self) -> list[str]:
        """SIGKILL the supervisor, reap it and wait (bounded) until nothing it started is alive.
        Returns the processes that outlived it past the bound (then kills them)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + self.cfg.orphan_timeout
        left = tagged(self.tag)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = tagged(self.tag)
        survivors = [f"pid {p.pid} {' '.join(p.cmdline())[:120]}" for p in left if p.is_running()]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        return survivors

    def stop(self, timeout: float) -> int | None:
        """SIGTERM and wait for the exit code (None if it had to be killed)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            return None

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        kill_tagged(self.tag)

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for n in range(len(self.started)):
            path = self.workdir / f"supervisor-{n}.log"
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)


def call(app: cpsl.App, make: Callable[[int], messages.Message], timeout: float) -> Any:
    """One request with a bounded wait; a request that times out is forgotten (never resent)."""
    conn = app.client()
    fut = conn.request(make)
    try:
        return conn.wait_reply(fut, timeout)[0]
    except concurrent.futures.TimeoutError:
        conn.forget(fut)
        raise TimeoutError(f"no reply within {timeout} s") from None


def _cancel(task_id: str, req: int) -> messages.Message:
    return messages.Cancel(req, task_id)


def _wait(task_id: str, req: int) -> messages.Message:
    return messages.Wait(req, task_id)


# ---- the run --------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, cfg: Config, workdir: Path) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.lock_dir = workdir / "locks"
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.module_name = f"chaosapp_{self.tag[:12]}"
        (workdir / f"{self.module_name}.py").write_text(APP_SOURCE.format(
            state_dir=str(self.state_dir), lock_dir=str(self.lock_dir), workers=cfg.workers,
            process_workers=cfg.process_workers, retries=cfg.retries))
        self.mod = self._import()
        self.app: cpsl.App = self.mod.app
        self.service = Service(workdir, self.module_name, self.state_dir, self.tag, cfg)
        self.report = Report()
        self.sent: list[Sent] = []
        self.progress = 0  # plan items acknowledged so far
        self.stop_killing = threading.Event()
        self.stop_submitting = threading.Event()
        self.kill_lock = threading.Lock()  # held by the killer per kill, by the main thread per restart
        self.submitter_error: BaseException | None = None

    def _import(self) -> ModuleType:
        spec = importlib.util.spec_from_file_location(self.module_name, self.workdir / f"{self.module_name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.module_name] = module
        spec.loader.exec_module(module)
        return module

    # ---- the plan and the submitter ---------------------------------------------------------------
    def plan(self) -> list[tuple[str, tuple[Any, ...], float | None]]:
        kinds, weights = zip(*MIX)
        out: list[tuple[str, tuple[Any, ...], float | None]] = []
        for i in range(self.cfg.tasks):
            kind = self.rng.choices(kinds, weights)[0]
            key = self.rng.randrange(self.cfg.keys)
            if kind == "delayed":
                base = self.rng.choice(("async", "process"))
                out.append((base, (i,), self.rng.uniform(0.0, self.cfg.max_delay)))
            elif kind == "delayed_locked":
                out.append(("locked", (key, i), self.rng.uniform(0.0, self.cfg.max_delay)))
            elif kind in ("locked", "plocked"):
                out.append((kind, (key, i), None))
            else:
                out.append((kind, (i,), None))
        return out

    def task_of(self, kind: str) -> cpsl.Task[Any, Any]:
        tasks: dict[str, cpsl.Task[Any, Any]] = {
            "async": self.mod.anoop, "process": self.mod.pnoop, "locked": self.mod.locked, "plocked": self.mod.plocked}
        return tasks[kind]

    def _submit_group(self, kind: str, args: list[tuple[Any, ...]],
                      delays: list[float | None]) -> list[cpsl.TaskHandle]:
        """One map() (immediate items) or one schedule() per item (delayed ones); a submit that
        fails because the supervisor is down is sent again, with new task ids."""
        task = self.task_of(kind)
        if delays[0] is None:
            return self._retry(len(args), lambda: task.map(args))
        out = []
        for a, d in zip(args, delays):
            out += self._retry(1, functools.partial(lambda a, d: [task.schedule(*a, delay=d)], a, d))
        return out

    def _retry(self, n: int, send: Callable[[], list[cpsl.TaskHandle]]) -> list[cpsl.TaskHandle]:
        deadline = time.monotonic() + 120.0
        while True:
            self.report.submitted += n
            try:
                return send()
            except (cpsl.NotRunning, TimeoutError) as exc:
                self.report.submit_errors[type(exc).__name__] += 1
                if self.stop_submitting.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def submitter(self, plan: list[tuple[str, tuple[Any, ...], float | None]]) -> None:
        try:
            batch = self.cfg.batch
            n_batches = max(1, (len(plan) + batch - 1) // batch)
            t0 = time.monotonic()
            for b in range(n_batches):
                if self.stop_submitting.is_set():
                    return
                wait = t0 + b * self.cfg.pace() / n_batches - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                items = plan[b * batch:(b + 1) * batch]
                groups: dict[tuple[str, bool], list[tuple[tuple[Any, ...], float | None]]]
                groups = collections.defaultdict(list)
                for kind, args, delay in items:
                    groups[(kind, delay is not None)].append((args, delay))
                for (kind, delayed), group in groups.items():
                    handles = self._submit_group(kind, [g[0] for g in group], [g[1] for g in group])
                    for (args, _), h in zip(group, handles):
                        self.sent.append(Sent(kind, args[-1], h))
                        self.report.by_kind[f"delayed {kind}" if delayed else kind] += 1
                    self._maybe_cancel(self.sent[-len(handles):])
                self.progress += len(items)
        except BaseException as exc:  # reported by the main thread
            self.submitter_error = exc

    def _maybe_cancel(self, sent: list[Sent]) -> None:
        for s in sent:
            if self.rng.random() >= self.cfg.cancel_share:
                continue
            self.report.cancel_requests += 1
            try:
                s.cancelled = bool(call(self.app, functools.partial(_cancel, s.handle.id), 30.0))
            except (TimeoutError, cpsl.CapsuleError) as exc:
                self.report.submit_errors[f"cancel {type(exc).__name__}"] += 1
            self.report.cancel_true += s.cancelled

    # ---- the killer ---------------------------------------------------------------------------------
    def killer(self) -> None:
        lo, hi = self.cfg.kill_every
        rng = random.Random(self.cfg.seed + 1)
        while not self.stop_killing.wait(rng.uniform(lo, hi)):
            with self.kill_lock:
                try:
                    status = call(self.app, messages.Status, 2.0)
                except (TimeoutError, cpsl.CapsuleError):
                    continue
                sup = self.service.proc
                actors = [a for a in status["actors"] if a["pid"]]
                if not actors or sup is None:
                    continue
                for n, victim in enumerate(rng.sample(actors, min(self.cfg.burst, len(actors)))):
                    if n:
                        time.sleep(rng.uniform(0.0, 0.004))  # a burst: the next one dies a moment later
                    try:  # only a process that is still an actor of our supervisor (pids are reused)
                        proc = psutil.Process(victim["pid"])
                        template = psutil.Process(proc.ppid())
                        if template.ppid() != sup.pid:
                            continue
                        proc.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        continue
                    self.report.actor_kills[victim["role"]] += 1

    # ---- main ---------------------------------------------------------------------------------------
    def run(self) -> Report:
        cfg, report = self.cfg, self.report
        t0 = time.monotonic()
        threads: list[threading.Thread] = []
        try:
            self.service.start()
            plan = self.plan()
            submitter = threading.Thread(target=self.submitter, args=(plan,), name="chaos-submit", daemon=True)
            killer = threading.Thread(target=self.killer, name="chaos-kill", daemon=True)
            threads = [submitter, killer]
            submitter.start()
            killer.start()
            marks = [len(plan) * (k + 1) // (cfg.supervisor_kills + 1) for k in range(cfg.supervisor_kills)]
            for mark in marks:
                if not self._wait_submits(mark, submitter):
                    break
                with self.kill_lock:
                    assert self.service.proc is not None
                    cfg.log(f"chaos: SIGKILL of the supervisor (pid {self.service.proc.pid}) after "
                            f"{self.progress} of {len(plan)} submits")
                    survivors = self.service.sigkill()
                    if survivors:
                        report.fail(f"processes outlived a SIGKILLed supervisor by {cfg.orphan_timeout} s: "
                                    f"{survivors}")
                    time.sleep(cfg.downtime)
                    self.service.start()
                    report.supervisor_restarts += 1
            if not self._wait_submits(len(plan), submitter):
                report.fail(f"submits stalled: {self.progress} of {len(plan)} acknowledged, none in the last "
                            f"{cfg.stall_timeout:.0f} s; {self.diagnose()}")
            elif self.submitter_error is not None:
                report.fail(f"the submitter failed: {self.submitter_error!r}")
            time.sleep(cfg.tail)
            self.stop_killing.set()
            killer.join(30)
            cfg.log(f"chaos: {len(self.sent)} acknowledged, {sum(report.actor_kills.values())} actor kills; "
                    "waiting for every task")
            outcomes = self.collect()
            self.wait_no_live_rows()
            self.final_status()
            code = self.service.stop(self.app.grace + 30.0)
            if code != 0:
                report.fail(f"graceful stop of the supervisor: exit code {code}")
            self.check_orphans()
            self.check_db(outcomes)
            self.check_intervals()
        except Exception as exc:
            report.fail(f"the run failed: {type(exc).__name__}: {exc}")
        finally:
            self.stop_submitting.set()
            self.stop_killing.set()
            self.service.kill_all()
            Client.close_all(self.app.resolved_state_dir())
            for t in threads:
                t.join(15)
            sys.modules.pop(self.module_name, None)
            report.elapsed = time.monotonic() - t0
        if report.failures:
            (self.workdir / "failures.txt").write_text("\n".join(report.failures) + "\n\n" + self.service.log_tail())
        return report

    def _wait_submits(self, target: int, submitter: threading.Thread) -> bool:
        """Until ``target`` plan items are acknowledged (or the submitter ended): False when no
        submit was acknowledged for ``stall_timeout`` seconds."""
        last, since = self.progress, time.monotonic()
        while self.progress < target and submitter.is_alive():
            time.sleep(0.01)
            if self.progress != last:
                last, since = self.progress, time.monotonic()
            elif time.monotonic() - since > self.cfg.stall_timeout:
                return False
        return True

    def diagnose(self) -> str:
        """What the supervisor believes (actors, and whether their pids exist) and the live rows."""
        parts = []
        try:
            status = call(self.app, messages.Status, 5.0)
            parts.append("actors: " + ", ".join(
                f"{a['slot']} pid {a['pid']} {a['state']} running {a['running']}"
                + ("" if a["pid"] is None or psutil.pid_exists(a["pid"]) else " (NO SUCH PROCESS)")
                for a in status["actors"]))
        except (TimeoutError, cpsl.CapsuleError) as exc:
            parts.append(f"no status: {exc!r}")
        with contextlib.suppress(sqlite3.Error):
            rows = self._query("SELECT state, slot, name, count(*) FROM tasks WHERE state IN "
                               "('QUEUED','SCHEDULED','RUNNING') GROUP BY state, slot, name")
            parts.append("live rows (state, slot, task, count): " + str(rows))
        return "; ".join(parts)

    def collect(self) -> dict[str, tuple[str, Any]]:
        """Wait for every acknowledged handle: id -> ("value", v) | ("error", exc) | ("pending", None).

        Like ``cpsl.wait_all`` (one ``Wait`` per task, all in flight at once), but each reply is
        taken as it comes, so one stuck task does not hide the others. Gives up after
        ``drain_timeout``, or once no task has finished for ``stall_timeout`` seconds."""
        report = self.report
        handles = list({s.handle.id: s.handle for s in self.sent}.values())
        report.acknowledged = len(handles)
        conn = self.app.client()
        waits = {h.id: (h, conn.request(functools.partial(_wait, h.id))) for h in handles}
        errors: dict[str, Exception] = {}
        deadline = time.monotonic() + self.cfg.drain_timeout
        since = time.monotonic()
        while waits:
            done = [tid for tid, (_, fut) in waits.items() if fut.done()]
            for tid in done:
                h, fut = waits.pop(tid)
                try:
                    h._final = conn.wait_reply(fut, 0.0)
                except Exception as exc:  # an error reply (UnknownTask...), not the task's outcome
                    errors[tid] = exc
            now = time.monotonic()
            if done:
                since = now
            elif waits and (now > deadline or now - since > self.cfg.stall_timeout):
                report.fail(f"{len(waits)} acknowledged tasks did not finish (none finished in the last "
                            f"{now - since:.0f} s), e.g. {list(waits)[:3]}; {self.diagnose()}")
                break
            time.sleep(0.05)
        for _, fut in waits.values():
            conn.forget(fut)
        if errors:
            report.fail(f"{len(errors)} waits got an error reply, e.g. {list(errors.items())[:3]}")
        return self._outcomes(handles)

    def _outcomes(self, handles: list[cpsl.TaskHandle]) -> dict[str, tuple[str, Any]]:
        outcomes: dict[str, tuple[str, Any]] = {}
        for h in handles:
            if h._final is None:
                outcomes[h.id] = ("pending", None)
                continue
            try:
                outcomes[h.id] = ("value", h.result())
            except Exception as exc:
                outcomes[h.id] = ("error", exc)
        wrong = [f"{s.handle.id} ({s.kind} {s.expected}) returned {outcomes[s.handle.id][1]!r}"
                 for s in self.sent if outcomes[s.handle.id][0] == "value" and outcomes[s.handle.id][1] != s.expected]
        if wrong:
            self.report.fail(f"{len(wrong)} tasks returned a wrong value, e.g. {wrong[:5]}")
        return outcomes

    def wait_no_live_rows(self) -> None:
        """Rows nobody holds a handle for (submits whose reply was lost) must end too."""
        deadline = time.monotonic() + min(60.0, self.cfg.stall_timeout)
        while time.monotonic() < deadline:
            if not self._query("SELECT id FROM tasks WHERE state IN ('QUEUED','SCHEDULED','RUNNING') LIMIT 1"):
                return
            time.sleep(0.1)

    def final_status(self) -> None:
        """After the chaos, every actor the supervisor counts as up must be a live process."""
        try:
            status = call(self.app, messages.Status, 10.0)
        except (TimeoutError, cpsl.CapsuleError) as exc:
            self.report.fail(f"no status from the supervisor after the run: {exc!r}")
            return
        self.report.restarts_reported = sum(a["restarts"] for a in status["actors"])
        ghosts = [f"{a['slot']} pid {a['pid']} ({a['state']}, running {a['running']})"
                  for a in status["actors"] if a["pid"] is not None and not psutil.pid_exists(a["pid"])]
        if ghosts:
            time.sleep(2.0)  # an exit being handled right now would be gone from a second status
            status = call(self.app, messages.Status, 10.0)
            still = {(a["slot"], a["pid"]) for a in status["actors"]}
            ghosts = [g for g in ghosts if (g.split()[0], int(g.split()[2])) in still]
        if ghosts:
            self.report.fail(f"the supervisor lists actors whose process no longer exists: {ghosts}")

    def check_orphans(self) -> None:
        deadline = time.monotonic() + self.cfg.orphan_timeout
        left = tagged(self.tag)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = tagged(self.tag)
        if left:
            self.report.fail("orphan processes after the stop: "
                             + "; ".join(f"pid {p.pid} {' '.join(p.cmdline())[:120]}" for p in left))

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.state_dir / 'capsule.db'}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def check_db(self, outcomes: dict[str, tuple[str, Any]]) -> None:
        report = self.report
        report.integrity = ", ".join(r[0] for r in self._query("PRAGMA integrity_check"))
        if report.integrity != "ok":
            report.fail(f"PRAGMA integrity_check: {report.integrity}")
        rows = {r[0]: r[1:] for r in self._query(
            "SELECT id, state, attempts, error_type, error_message, name FROM tasks")}
        report.rows = len(rows)
        acked = {s.handle.id for s in self.sent}
        report.unacknowledged_rows = len(rows.keys() - acked)
        if report.unacknowledged_rows:
            # the payload is (args, kwargs) as this process pickled it; the last argument is the item
            import cloudpickle

            expected = {s.expected for s in self.sent}
            ghosts = [cloudpickle.loads(blob)[0][-1] for tid, blob in self._query("SELECT id, args FROM tasks")
                      if tid not in acked]
            report.ran_twice = sum(1 for i in ghosts if i in expected)
        live = [(tid, r[0], r[4]) for tid, r in rows.items() if r[0] in LIVE]
        if live:
            report.fail(f"{len(live)} rows still live after the run, e.g. {live[:5]}")
        attempts = [r[1] for r in rows.values()]
        report.max_attempts = max(attempts, default=0)
        report.retried_tasks = sum(a > 1 for a in attempts)
        if report.max_attempts > 1 + self.cfg.retries:
            report.fail(f"a task ran {report.max_attempts} attempts with retries={self.cfg.retries}")
        bad: list[str] = []
        for s in {s.handle.id: s for s in self.sent}.values():
            self._check_task(s, rows.get(s.handle.id), outcomes[s.handle.id], bad)
        if bad:
            report.fail(f"{len(bad)} acknowledged tasks are wrong, e.g. {bad[:8]}")

    def _check_task(self, s: Sent, row: tuple[Any, ...] | None, outcome: tuple[str, Any], bad: list[str]) -> None:
        """One acknowledged task: its row is terminal and agrees with what result() said."""
        report, tid = self.report, s.handle.id
        kind, value = outcome
        if row is None:
            bad.append(f"{tid} ({s.kind}): acknowledged but has no row")
            return
        state, _, etype, emsg, _ = row
        if state not in TERMINAL:
            bad.append(f"{tid} ({s.kind}): {state}")
            return
        if state == "SUCCEEDED":
            report.succeeded += 1
        elif state == "CANCELLED":
            report.cancelled += 1
        else:
            report.failed[etype or "?"] += 1
            if etype != "WorkerCrashed":
                bad.append(f"{tid} ({s.kind}): FAILED with {etype}: {emsg}")
        if kind == "value":
            seen = "SUCCEEDED"
        elif kind == "error":
            seen = "CANCELLED" if isinstance(value, cpsl.TaskCancelled) else "FAILED"
        else:
            seen = "PENDING"
        if seen != state:
            bad.append(f"{tid} ({s.kind}): result() said {seen} ({value!r}) but the row is {state}")
        if s.cancelled and state != "CANCELLED":
            bad.append(f"{tid} ({s.kind}): cancel() returned True but it ended {state}")

    def check_intervals(self) -> None:
        report = self.report
        path = self.lock_dir / "intervals.log"
        starts: dict[str, tuple[str, float, str]] = {}
        ends: dict[str, float] = {}
        overlaps: list[str] = []
        for line in path.read_text().splitlines() if path.exists() else []:
            mark, key, i, token, pid, t = line.split()
            if mark == "S":
                starts[token] = (key, float(t), f"{key} #{i} pid {pid}")
            elif mark == "E":
                ends[token] = float(t)
            else:
                overlaps.append(f"{key} #{i} pid {pid} started while another body held the flock at {t}")
        report.locked_bodies = len(starts)
        report.killed_bodies = len(starts.keys() - ends.keys())
        by_key: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
        for token, (key, start, what) in starts.items():
            if token in ends:
                by_key[key].append((start, ends[token], what))
        for spans in by_key.values():
            spans.sort()
            last_end, last_what = float("-inf"), ""
            for start, end, what in spans:
                if start < last_end:
                    overlaps.append(f"{what} started at {start:.6f} before {last_what} ended at {last_end:.6f}")
                if end > last_end:
                    last_end, last_what = end, what
        if overlaps:
            report.fail(f"{len(overlaps)} overlapping runs of one lock key, e.g. {overlaps[:5]}")
        # every locked task that succeeded ran a whole body at least once
        whole = {int(what.split("#")[1].split()[0]) for spans in by_key.values() for _, _, what in spans}
        ok = {s.expected for s in self.sent if s.kind in ("locked", "plocked")
              and self._succeeded(s.handle)}
        missing = sorted(ok - whole)
        if missing:
            report.fail(f"{len(missing)} locked tasks SUCCEEDED without a complete body, e.g. {missing[:5]}")

    @staticmethod
    def _succeeded(h: cpsl.TaskHandle) -> bool:
        return h._final is not None and h._final[0][0] == "SUCCEEDED"


def run_chaos(cfg: Config, workdir: Path) -> Report:
    """One chaos run in ``workdir`` (created if needed); every process it starts is stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Chaos(cfg, workdir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000, help="tasks to submit (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan and of the killer (default 0)")
    parser.add_argument("--submit-seconds", type=float, default=None,
                        help="spread the submits over this many seconds (default tasks/100)")
    parser.add_argument("--supervisor-kills", type=int, default=2, help="supervisor SIGKILLs + restarts (2)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for every task after the chaos (default 300)")
    parser.add_argument("--tail", type=float, default=2.0,
                        help="actor kills go on this many seconds after the last submit (default 2)")
    parser.add_argument("--downtime", type=float, default=0.0,
                        help="keep the supervisor down this many more seconds after each SIGKILL (default 0; "
                             "over 5 s, submits waiting meanwhile fail with NotRunning and are sent again)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="give up when no submit was acknowledged, or no task finished, for this long (60)")
    parser.add_argument("--kill-ms", default="50,200",
                        help="MIN,MAX milliseconds between two actor SIGKILLs (default 50,200)")
    parser.add_argument("--burst", type=int, default=1,
                        help="actors SIGKILLed per tick, 0-4 ms apart (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (state, logs, intervals)")
    args = parser.parse_args(argv)
    try:
        lo, hi = (float(x) / 1000.0 for x in args.kill_ms.split(","))
    except ValueError:
        parser.error(f"--kill-ms {args.kill_ms!r}: expected MIN,MAX in milliseconds")
    cfg = Config(kill_every=(lo, hi), burst=args.burst, tasks=args.tasks, seed=args.seed,
                 submit_seconds=args.submit_seconds,
                 supervisor_kills=args.supervisor_kills, drain_timeout=args.drain_timeout, tail=args.tail,
                 stall_timeout=args.stall_timeout, downtime=args.downtime,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    hard = cfg.pace() + cfg.tail + cfg.drain_timeout + cfg.supervisor_kills * cfg.downtime + 300.0
    print(f"capsule_actors {cpsl.__version__} chaos: {cfg.tasks} tasks (seed {cfg.seed}), actor SIGKILLs every "
          f"{cfg.kill_every[0] * 1000:.0f}-{cfg.kill_every[1] * 1000:.0f} ms"
          f"{f' ({cfg.burst} at a time)' if cfg.burst > 1 else ''}, {cfg.supervisor_kills} supervisor "
          f"SIGKILLs, workers={cfg.workers} process_workers={cfg.process_workers} retries={cfg.retries}")
    workdir = Path(tempfile.mkdtemp(prefix="cpsl-chaos-", dir="/tmp"))
    chaos: list[Chaos] = []

    def expire() -> None:
        print(f"chaos.py: over its hard limit of {hard:.0f} s; stopping everything (work directory kept: "
              f"{workdir})", file=sys.stderr, flush=True)
        for c in chaos:
            with contextlib.suppress(Exception):
                c.service.kill_all()
        os._exit(2)

    timer = threading.Timer(hard, expire)
    timer.daemon = True
    timer.start()
    try:
        c = Chaos(cfg, workdir)
        chaos.append(c)
        report = c.run()
    finally:
        timer.cancel()
        if not args.keep and not (workdir / "failures.txt").exists():
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(report.lines()))
    if args.keep:
        print(f"work directory kept: {workdir}")
    if report.failures:
        print(f"\nFAILED ({len(report.failures)} checks); work directory kept: {workdir}")
        for f in report.failures:
            print(f"  - {f}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
