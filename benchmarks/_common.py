"""Shared pieces of the benchmarks: percentiles, a short temp dir, and the raw-pyzmq floor.

The *floor* is the least any design with capsule_actors' process layout could cost: one Python
ROUTER process between the caller and 2 worker processes, all on ``ipc://`` sockets, the task
and its result as cloudpickle bytes. It has no store, no headers to validate, no retries, no
handles: it only moves bytes. A submit is acknowledged by the router (like ``.submit()``
returning after the supervisor's reply) and the result is pushed to the caller when the worker
is done.

Run as a script, this file is the floor's router or worker process::

    python _common.py router CLIENT_EP WORKER_EP
    python _common.py worker WORKER_EP
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
PR_SET_PDEATHSIG = 1

# ---- small helpers -----------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (the numpy default), pct in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    data = sorted(values)
    rank = (len(data) - 1) * pct / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return data[lo] + (data[hi] - data[lo]) * (rank - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def temp_dir(prefix: str = "cpsl-bench-") -> Iterator[Path]:
    """A short private directory under /tmp (ipc:// socket paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def postgres(store: str) -> Iterator[tuple[str, str]]:
    """(URL, note): ``store`` itself (in a schema of this run's own), or with ``temp`` a server of
    this run's own (Debian's postgresql, fsync on, a Unix socket; stopped after)."""
    if store != "temp":
        yield store + ("&" if "?" in store else "?") + f"schema=bench_{os.getpid()}", f"PostgreSQL: {store}"
        return
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from postgres_server import PostgresServer

    with PostgresServer(fsync=True) as server:
        server.create_database("bench")
        version = subprocess.run([str(server.bin / "postgres"), "--version"], capture_output=True, text=True).stdout
        yield server.url("bench"), f"PostgreSQL: a server of this run's own ({version.strip()}, fsync on, Unix socket)"


class Deadline:
    """A per-scenario time budget; ``left()`` feeds the timeouts of every blocking call."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.what}: over its deadline of {self.seconds:g} s")
        return left


def stop_pid(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def machine_info() -> dict[str, str]:
    import platform

    import zmq

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def print_machine() -> None:
    info = machine_info()
    print(f"machine: nproc={info['nproc']}  cpu={info['cpu']}  python {info['python']}  "
          f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']})")


# ---- the raw-pyzmq floor -------------------------------------------------------------------------
# Client -> router: [req_id, fn, args]           router -> client: [b"A", req_id]  (the ack)
# router -> worker: [worker, client, req_id, fn, args]
# worker -> router: [client, req_id, result]     router -> client: [b"R", req_id, result]
# fn is the task function pickled once by the caller (workers unpickle each distinct blob once,
# as capsule_actors ships its registry once); args and result are cloudpickled per task.
# Handshake: worker -> router [b"READY"]; client -> router [b"HELLO"] -> [b"HELLO", n_workers].

ACK, RES, HELLO, READY = b"A", b"R", b"HELLO", b"READY"


def _router_main(client_ep: str, worker_ep: str) -> None:
    import zmq

    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 0
    front.bind(client_ep)
    back.bind(worker_ep)
    workers: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    try:
        while True:
            ready = dict(poller.poll())
            if back in ready:
                while True:
                    try:
                        frames = back.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if len(frames) == 2 and frames[1].bytes == READY:
                        workers.append(frames[0].bytes)
                        continue
                    _, client, req, result = frames
                    front.send_multipart([client, RES, req, result], copy=False)
            if front in ready:
                while True:
                    try:
                        frames = front.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    client = frames[0]
                    if len(frames) == 2 and frames[1].bytes == HELLO:
                        front.send_multipart([client, HELLO, str(len(workers)).encode()])
                        continue
                    _, req, fn, args = frames
                    front.send_multipart([client, ACK, req], copy=False)
                    worker = workers[turn % len(workers)]
                    turn += 1
                    back.send_multipart([worker, client, req, fn, args], copy=False)
    finally:
        front.close(0)
        back.close(0)
        ctx.term()


def _worker_main(worker_ep: str) -> None:
    import cloudpickle
    import zmq

    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(worker_ep)
    sock.send(READY)
    funcs: dict[bytes, Callable[..., Any]] = {}
    try:
        while True:
            client, req, fn_blob, args = sock.recv_multipart()
            fn = funcs.get(fn_blob)
            if fn is None:
                fn = funcs[fn_blob] = cloudpickle.loads(fn_blob)
            result = cloudpickle.dumps(fn(*cloudpickle.loads(args)), protocol=5)
            sock.send_multipart([client, req, result])
    finally:
        sock.close(0)
        ctx.term()


class Floor:
    """The floor's router and 2 workers as child processes, plus this process's DEALER.

    ``with Floor(tmp) as floor:`` starts them and waits until both workers are connected;
    leaving the block stops every one of them by pid.
    """

    def __init__(self, tmp: Path, n_workers: int = 2, start_timeout: float = 20.0) -> None:
        self.tmp = tmp
        self.n_workers = n_workers
        self.start_timeout = start_timeout
        self.client_ep = f"ipc://{tmp}/floor-c.sock"
        self.worker_ep = f"ipc://{tmp}/floor-w.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._ids = 0
        self._fn_blobs: dict[Any, bytes] = {}

    def __enter__(self) -> Floor:
        import zmq

        try:
            me = [sys.executable, str(Path(__file__).resolve())]
            self.procs.append(subprocess.Popen([*me, "router", self.client_ep, self.worker_ep]))
            for _ in range(self.n_workers):
                self.procs.append(subprocess.Popen([*me, "worker", self.worker_ep]))
            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 0
            self.sock.sndhwm = self.sock.rcvhwm = 0
            self.sock.connect(self.client_ep)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            stop_pid(proc)
        self.procs.clear()
        if hasattr(self, "sock"):
            self.sock.close(0)
            self.ctx.term()
            del self.sock

    def _wait_ready(self) -> None:
        deadline = Deadline(self.start_timeout, "starting the pyzmq floor")
        while True:
            self.sock.send(HELLO)
            if self.sock.poll(200):
                reply = self.sock.recv_multipart()
                if reply[0] == HELLO and int(reply[1]) >= self.n_workers:
                    return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"floor process {proc.args} exited with {proc.returncode}")
            deadline.left()
            time.sleep(0.05)

    def _recv(self, deadline: Deadline) -> list[bytes]:
        while not self.sock.poll(max(1, int(deadline.left() * 1000))):
            pass  # deadline.left() raises once the budget is spent
        return self.sock.recv_multipart()

    def _send(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
        import cloudpickle

        blob = self._fn_blobs.get(fn)
        if blob is None:
            blob = self._fn_blobs[fn] = cloudpickle.dumps(fn, protocol=5)
        self._ids += 1
        req = self._ids.to_bytes(8, "little")
        self.sock.send_multipart([req, blob, cloudpickle.dumps(args, protocol=5)])
        return req

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], results: dict[bytes, Any],
               deadline: Deadline) -> bytes:
        """Send one task and wait for the router's ack (results that arrive meanwhile are kept)."""
        req = self._send(fn, args)
        while True:
            frames = self._recv(deadline)
            if frames[0] == ACK and frames[1] == req:
                return req
            if frames[0] == RES:
                results[frames[1]] = frames[2]

    def send_only(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
        """Send one task without waiting for its ack (the pipelined variant)."""
        return self._send(fn, args)

    def collect(self, reqs: list[bytes], results: dict[bytes, Any], deadline: Deadline) -> list[Any]:
        """Wait until every request in ``reqs`` has its result; return the values in order."""
        import cloudpickle

        wanted = set(reqs) - results.keys()
        while wanted:
            frames = self._recv(deadline)
            if frames[0] == RES:
                results[frames[1]] = frames[2]
                wanted.discard(frames[1])
        return [cloudpickle.loads(results.pop(r)) for r in reqs]


# ---- process trees, deadlines, a throwaway redis-server (dedup.py, crash_recovery.py) -----------


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` and every descendant of it (found with psutil), children first."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.send_signal(sig)


def stop_tree(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM to ``proc``, SIGKILL to it and to every descendant after ``grace``; reaps ``proc``.

    Descendants are listed before the SIGTERM, so children that outlive their parent (reparented
    to init) are still found and killed."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill_tree(proc.pid)
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            kid.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Watchdog:
    """A hard limit on a whole benchmark run, for calls that take no timeout.

    After ``seconds`` it runs the registered cleanups (stopping child processes by pid), prints
    what ran over and ends this process with exit code 2. ``cancel()`` (or leaving ``with``)
    disarms it."""

    def __init__(self, seconds: float, what: str) -> None:
        import threading

        self.what = what
        self.seconds = seconds
        self.cleanups: list[Callable[[], object]] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    def cancel(self) -> None:
        self._timer.cancel()

    def on_expire(self, fn: Callable[[], object]) -> None:
        self.cleanups.append(fn)

    def _expire(self) -> None:
        print(f"{self.what}: over its hard limit of {self.seconds:g} s; stopping everything",
              file=sys.stderr, flush=True)
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        os._exit(2)


class RedisServer:
    """``redis-server`` on 127.0.0.1 and a free port, no persistence; stopped by pid on exit."""

    def __init__(self, start_timeout: float = 10.0) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def __enter__(self) -> RedisServer:
        import socket

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = Deadline(self.start_timeout, "starting redis-server")
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
                deadline.left()
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


def stats_ms(values: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of durations in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values]
    return percentile(ms, 50), percentile(ms, 99), max(ms)


def print_package(pkg_dir: Path) -> None:
    """Say which copy of the package runs, and warn when the supervisor may run another one: it is
    started with ``python -m`` from the current directory, which comes first on its sys.path."""
    here = Path.cwd() / pkg_dir.name
    print(f"{pkg_dir.name} from {pkg_dir}")
    if here.is_dir() and here.resolve() != pkg_dir.resolve():
        print(f"warning: {here} exists too; the supervisor and actors (python -m, started in this "
              f"directory) import that copy first")


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "router":
        _router_main(sys.argv[2], sys.argv[3])
    elif role == "worker":
        _worker_main(sys.argv[2])
    else:
        raise SystemExit(f"unknown role {role!r}")


def run_script(main: Callable[[], int], script: str) -> None:
    """The ``__main__`` block of every benchmark: exit 2 (and say why) when a scenario ran past
    its deadline -- everything it started has been stopped by then."""
    try:
        sys.exit(main())
    except TimeoutError as exc:
        print(f"{Path(script).name}: {exc}", file=sys.stderr)
        sys.exit(2)
