"""Peers for ``--compare``: Celery, Dramatiq, RQ and Huey on a throwaway ``redis-server``.

One adapter per peer. ``with peers.running("celery", tmp) as peer:`` starts ``redis-server`` on
127.0.0.1 and a free port (``_common.RedisServer``), writes a no-op task module (it returns its
argument) to ``tmp/peer-<name>/``, imports it here, starts the peer's worker(s) as subprocesses
(each in its own session) and waits until a warm-up task has come back. Inside the block:

    h = peer.submit(x)              # the peer's normal submit call
    peer.result(h, timeout)         # the peer's normal blocking wait; TimeoutError past timeout

Leaving the block stops every worker process (its process group, then its whole tree) and
``redis-server`` by pid, and removes the module directory; also on errors.

Configurations (2 cores, everything else at its defaults):

  celery    ``celery worker --pool prefork --concurrency 2``, Redis broker and result backend;
            ``task.delay(x)``, ``AsyncResult.get(timeout=)``.
  dramatiq  ``dramatiq --processes 2 --threads 8``, ``RedisBroker``, ``Results`` middleware on
            Redis; ``actor.send(x)``, ``message.get_result(block=True, timeout=)``.
  rq        two ``rq worker`` processes (the default forking ``Worker``: one work horse is forked
            per job); ``Queue.enqueue(fn, x)``, ``Job.latest_result(timeout=)`` (a blocking
            ``XREAD`` on the job's result stream, RQ >= 1.16; older RQ: the job's status polled
            every 1 ms).
  huey      ``huey_consumer -w 2 -k process``, ``RedisHuey(notify_result=True)``;
            ``task(x)``, ``Result.get(blocking=True, timeout=)``. ``notify_result`` (huey >= 3.0)
            makes the wait a ``BLPOP`` on a notification key; without it, ``get(blocking=True)``
            polls (first sleep 50 ms, then x1.15), which alone would put every round trip at
            >= 50 ms.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import Deadline, RedisServer, Watchdog, stop_tree  # noqa: E402

KNOWN = ("celery", "dramatiq", "rq", "huey")
QUEUE = "cpsl_bench"

# ---- the task module each peer's workers import (formatted with the Redis URL) -----------------

MODULES = {
    "celery": '''
from celery import Celery

app = Celery("cpsl_peer_celery", broker={url!r}, backend={url!r})
app.conf.update(broker_connection_retry_on_startup=True)


@app.task(name="noop")
def noop(x):
    return x
''',
    "dramatiq": '''
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

backend = RedisBackend(url={url!r})
broker = RedisBroker(url={url!r})
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop(x):
    return x
''',
    "rq": '''
def noop(x):
    return x
''',
    "huey": '''
from huey import RedisHuey

huey = RedisHuey("cpsl_bench", url={url!r}, notify_result=True)


@huey.task()
def noop(x):
    return x
''',
}

# what must be importable, the distributions whose versions are printed, the worker executable
REQUIRES = {
    "celery": (("celery", "redis"), ("celery", "kombu", "billiard", "redis"), "celery"),
    "dramatiq": (("dramatiq", "redis"), ("dramatiq", "redis"), "dramatiq"),
    "rq": (("rq", "redis"), ("rq", "redis"), "rq"),
    "huey": (("huey", "redis"), ("huey", "redis"), "huey_consumer"),
}

# the submit call and the blocking wait, as printed in the tables
CALLS = {
    "celery": ("delay()", "get()"),
    "dramatiq": ("send()", "get_result()"),
    "rq": ("enqueue()", "latest_result()"),
    "huey": ("task()", "get()"),
}

CONFIG = {
    "celery": "prefork x 2, Redis broker + result backend",
    "dramatiq": "2 processes x 8 threads, RedisBroker + Results(RedisBackend)",
    "rq": "2 rq worker processes (fork per job), Job.latest_result(timeout)",
    "huey": "consumer -w 2 -k process, RedisHuey(notify_result=True)",
}


def parse_list(text: str) -> list[str]:
    """``"celery, rq"`` -> ``["celery", "rq"]`` (duplicates dropped, order kept)."""
    out: list[str] = []
    for name in (p.strip().lower() for p in text.split(",")):
        if name and name not in out:
            out.append(name)
    return out


def _executable(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def unavailable(name: str) -> str | None:
    """None when ``name`` can run here; else why not (for a one-line "skipped" note)."""
    if name not in REQUIRES:
        return f"unknown peer (known: {', '.join(KNOWN)})"
    modules, _, exe = REQUIRES[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"not importable: {', '.join(missing)} (pip install .[bench])"
    if _executable(exe) is None:
        return f"{exe} not found next to {sys.executable} or on PATH"
    if name == "huey" and _major(importlib.metadata.version("huey")) < 3:
        return "huey < 3.0 has no notify_result; its blocking get() polls from 50 ms (pip install 'huey>=3')"
    if not RedisServer.available():
        return "redis-server is not on PATH"
    return None


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def versions(name: str) -> str:
    """``"celery 5.7.0 (kombu 5.7.0, billiard 4.3.2, redis 8.1.0)"``."""
    dists = []
    for dist in REQUIRES[name][1]:
        try:
            dists.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            dists.append(f"{dist} ?")
    return dists[0] + (f" ({', '.join(dists[1:])})" if len(dists) > 1 else "")


def label(name: str) -> str:
    """``"celery 5.7.0"``: the row label of a peer."""
    try:
        return f"{name} {importlib.metadata.version(REQUIRES[name][1][0])}"
    except importlib.metadata.PackageNotFoundError:
        return name


def redis_server_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "?"


class HardLimit(Watchdog):
    """``_common.Watchdog`` that also says when it has fired.

    When it fires, its cleanups stop redis-server and the workers under the main thread's feet,
    which then fails with some connection error; ``check()`` there lets the watchdog finish (it
    exits with 2) instead of reporting that error as the peer's result."""

    def __init__(self, seconds: float, what: str) -> None:
        super().__init__(seconds, what)
        self.expired = threading.Event()

    def _expire(self) -> None:
        self.expired.set()
        super()._expire()

    def check(self) -> None:
        if self.expired.is_set():
            self._timer.join(120)  # the watchdog ends the process with os._exit(2)
            os._exit(2)


def check_expired(dog: Watchdog | None) -> None:
    if isinstance(dog, HardLimit):
        dog.check()


# ---- worker processes ----------------------------------------------------------------------------


class Workers:
    """The peer's worker commands, each in its own session; ``close()`` stops them by pid."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str]) -> None:
        with open(self.log, "ab") as log:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True,
                                               cwd=self.log.parent))

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(proc.args[0]).name} exited with {proc.returncode}; "
                                   f"last log lines:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self) -> None:
        procs, self.procs = self.procs, []
        for proc in procs:  # SIGTERM to each whole session first, so all of them stop at once
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            stop_tree(proc, grace=5.0)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


# ---- the adapter -----------------------------------------------------------------------------------


class Peer:
    """A running peer: ``submit(x) -> handle`` and ``result(handle, timeout) -> value``."""

    def __init__(self, name: str, mod: Any, url: str) -> None:
        self.name = name
        self.label = label(name)
        self.versions = versions(name)
        self.config = CONFIG[name]
        self.mod = mod
        self.submit: Callable[[Any], Any]
        self.result: Callable[[Any, float], Any]
        getattr(self, f"_bind_{name}")(url)

    def _bind_celery(self, url: str) -> None:
        from celery.exceptions import TimeoutError as CeleryTimeout

        task = self.mod.noop

        def result(h: Any, timeout: float) -> Any:
            try:
                return h.get(timeout=max(0.001, timeout))
            except CeleryTimeout:
                raise TimeoutError(f"celery: no result within {timeout:.1f} s") from None

        self.submit, self.result = task.delay, result

    def _bind_dramatiq(self, url: str) -> None:
        from dramatiq.results import ResultTimeout

        backend, actor = self.mod.backend, self.mod.noop

        def result(message: Any, timeout: float) -> Any:
            # The Redis backend blocks in whole seconds (BRPOPLPUSH); a result that is there
            # returns at once, so rounding the timeout up costs nothing.
            try:
                return message.get_result(backend=backend, block=True, timeout=max(1000, math.ceil(timeout) * 1000))
            except ResultTimeout:
                raise TimeoutError(f"dramatiq: no result within {timeout:.1f} s") from None

        self.submit, self.result = actor.send, result

    def _bind_rq(self, url: str) -> None:
        import redis
        from rq import Queue
        from rq.job import Job

        self.conn = redis.Redis.from_url(url)
        queue, fn = Queue(QUEUE, connection=self.conn), self.mod.noop

        def submit(x: Any) -> Any:
            return queue.enqueue(fn, x)

        def result(job: Any, timeout: float) -> Any:
            from rq.results import Result

            res = job.latest_result(timeout=max(1, math.ceil(timeout)))  # XREAD BLOCK, whole seconds
            if res is None:
                raise TimeoutError(f"rq: no result within {timeout:.1f} s")
            if res.type != Result.Type.SUCCESSFUL:
                raise RuntimeError(f"rq job {job.id}: {res.type.name}: {res.exc_string}")
            return res.return_value

        def polled(job: Any, timeout: float) -> Any:
            """RQ < 1.16 cannot block for a result: poll the job's status every 1 ms."""
            end = time.monotonic() + timeout
            while True:
                status = job.get_status(refresh=True)
                if status == "finished":
                    return job.return_value(refresh=True)
                if status in ("failed", "stopped", "canceled"):
                    raise RuntimeError(f"rq job {job.id}: {status}")
                if time.monotonic() >= end:
                    raise TimeoutError(f"rq: no result within {timeout:.1f} s")
                time.sleep(0.001)

        blocking = "timeout" in inspect.signature(Job.latest_result).parameters
        self.submit, self.result = submit, (result if blocking else polled)
        if not blocking:
            self.config = CONFIG["rq"].replace("Job.latest_result(timeout)", "job status polled every 1 ms")

    def _bind_huey(self, url: str) -> None:
        from huey.exceptions import ResultTimeout

        task = self.mod.noop

        def result(h: Any, timeout: float) -> Any:
            try:
                return h.get(blocking=True, timeout=max(0.001, timeout))
            except ResultTimeout:
                raise TimeoutError(f"huey: no result within {timeout:.1f} s") from None

        self.submit, self.result = task, result


def _worker_cmds(name: str, modname: str, pdir: Path, url: str) -> list[list[str]]:
    exe = _executable(REQUIRES[name][2])
    assert exe is not None
    if name == "celery":
        return [[exe, "-A", modname, "worker", "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
                 "--without-gossip", "--without-mingle", "-n", f"cpslbench{os.getpid()}@%h"]]
    if name == "dramatiq":
        return [[exe, modname, "--processes", "2", "--threads", "8"]]
    if name == "rq":
        return [[exe, "worker", "--url", url, "--path", str(pdir), "--logging_level", "WARNING",
                 "--name", f"cpslbench{os.getpid()}-{n}", QUEUE] for n in range(2)]
    return [[exe, f"{modname}.huey", "--workers", "2", "--worker-type", "process", "--quiet"]]


@contextlib.contextmanager
def running(name: str, tmp: Path, start_timeout: float = 90.0, warm: int = 20,
            dog: Watchdog | None = None) -> Iterator[Peer]:
    """Start redis-server and ``name``'s workers, warm up, yield the adapter; stop all by pid."""
    modname = f"cpsl_peer_{name}"
    pdir = tmp / f"peer-{name}"
    pdir.mkdir(parents=True, exist_ok=False)
    added_path = False
    workers: Workers | None = None
    try:
        with RedisServer() as redis:
            if dog is not None:
                dog.on_expire(redis.stop)
            (pdir / f"{modname}.py").write_text(MODULES[name].format(url=redis.url))
            sys.path.insert(0, str(pdir))
            added_path = True
            sys.modules.pop(modname, None)
            mod = importlib.import_module(modname)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pdir), *(p for p in sys.path if p)]),
                       PYTHONDONTWRITEBYTECODE="1")
            workers = Workers(env, pdir / "worker.log")
            if dog is not None:
                dog.on_expire(workers.close)
            peer = Peer(name, mod, redis.url)
            for cmd in _worker_cmds(name, modname, pdir, redis.url):
                workers.spawn(cmd)
            _warm_up(peer, workers, warm, Deadline(start_timeout, f"{name}: starting the workers"))
            yield peer
    finally:
        if workers is not None:
            workers.close()
        if added_path:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(pdir))
        sys.modules.pop(modname, None)
        shutil.rmtree(pdir, ignore_errors=True)


def _warm_up(peer: Peer, workers: Workers, n: int, deadline: Deadline) -> None:
    """Every worker process up and every code path imported: n tasks in flight, all back."""
    handles = [peer.submit(-1 - i) for i in range(n)]
    for i, h in enumerate(handles):
        while True:
            workers.check()
            wait = min(1.0, deadline.left())  # raises TimeoutError once the start budget is spent
            try:
                value = peer.result(h, wait)
                break
            except TimeoutError:  # not yet: check that the workers are still alive, then wait again
                continue
        if value != -1 - i:
            raise AssertionError(f"{peer.name}: warm-up task returned {value!r}")
    time.sleep(0.2)  # let the workers settle (prefetch, heartbeats) before the clock starts


def describe(name: str) -> str:
    return f"{versions(name)}; {CONFIG[name]}"
