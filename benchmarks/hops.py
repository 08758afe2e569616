"""What one hop and one task's store writes cost on this machine: the floor under a round trip.

    /work/venv/bin/python benchmarks/hops.py [--n 3000] [--store postgresql://...]

A ``submit()`` -> ``result()`` round trip crosses four ZeroMQ hops (client -> supervisor ->
actor -> supervisor -> client), two thread hand-offs in the client (the caller and the
connection's I/O thread), and writes one task's rows to SQLite. This prints the median cost of
each on this machine, measured in isolation, and their sum: the round trip that capsule_actors
would have with no Python work at all besides these.

  thread hand-off       two Python threads of one process ping-pong through eventfds; one way
  pipe hop              two processes ping-pong one byte through pipes (the kernel's wake-up); one way
  ZeroMQ hop            a DEALER and a ROUTER in two processes ping-pong over ipc://; one way
    of which send()     the sender's own time in a 3-frame send to an idle peer
  store, one task       the supervisor's rows for one task (insert + QUEUED event, RUNNING + event,
                        SUCCEEDED + event) in one transaction, on a WAL file, synchronous=NORMAL
                        (or on PostgreSQL with --store: synchronous_commit on, the runtime's setting)
    of which COMMIT     the commit alone
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the package from the checkout when it is not installed
    sys.path.append(str(HERE.parent))

from _common import median, print_machine, stop_pid, temp_dir  # noqa: E402

STOP = b"\xff"


def _one_way(n: int, ping: Callable[[], object], answer_fd: int, take: Callable[[], object], what: str) -> float:
    """Median of ``n`` round trips (``ping``, wait until ``answer_fd`` is readable, ``take``), halved."""
    poll = select.poll()
    poll.register(answer_fd, select.POLLIN)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        ping()
        if not poll.poll(5000):
            raise TimeoutError(f"{what}: no answer in 5 s")
        take()
        samples.append(time.perf_counter() - t0)
    return median(samples) / 2


def thread_handoff(n: int) -> float:
    """One way, seconds: a caller thread wakes another through an eventfd and is woken back."""
    there, back = os.eventfd(0), os.eventfd(0)

    def echo() -> None:
        poll = select.poll()
        poll.register(there, select.POLLIN)
        while True:
            poll.poll(5000)
            if os.eventfd_read(there) > 1:
                return
            os.eventfd_write(back, 1)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        return _one_way(n, lambda: os.eventfd_write(there, 1), back, lambda: os.eventfd_read(back),
                        "thread hand-off")
    finally:
        os.eventfd_write(there, 2)
        thread.join(5)
        os.close(there)
        os.close(back)


def _echo_pipe(rfd: int, wfd: int) -> None:
    while True:
        byte = os.read(rfd, 1)
        if byte in (b"", STOP):
            return
        os.write(wfd, byte)


def pipe_hop(n: int) -> float:
    """One way, seconds: one byte to another process and back through two pipes."""
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    proc = subprocess.Popen([sys.executable, __file__, "_echo_pipe", str(there_r), str(back_w)],
                            pass_fds=(there_r, back_w))
    os.close(there_r)
    os.close(back_w)
    try:
        one_way = _one_way(n, lambda: os.write(there_w, b"x"), back_r, lambda: os.read(back_r, 1), "pipe hop")
        os.write(there_w, STOP)
        return one_way
    finally:
        stop_pid(proc)
        os.close(there_w)
        os.close(back_r)


def _echo_zmq(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send(b"hello")
    while sock.poll(10_000):
        frames = sock.recv_multipart()
        if frames[0] == STOP:
            break
        sock.send_multipart(frames)
    sock.close(0)
    ctx.term()


def zmq_hop(n: int, tmp: Path) -> tuple[float, float]:
    """(one way, the sender's send() call), seconds: a ROUTER and a DEALER over ipc://."""
    import zmq

    endpoint = f"ipc://{tmp}/hop.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    proc = subprocess.Popen([sys.executable, __file__, "_echo_zmq", endpoint])
    trips, sends = [], []
    try:
        if not sock.poll(20_000):
            raise TimeoutError("ZeroMQ hop: the echo process did not connect in 20 s")
        peer = sock.recv_multipart()[0]
        header, payload = b"h" * 60, b"p" * 20  # about a Reply's header and a small result
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send(peer, zmq.SNDMORE)
            sock.send(header, zmq.SNDMORE)
            sock.send(payload)
            t1 = time.perf_counter()
            if not sock.poll(5000):
                raise TimeoutError("ZeroMQ hop: no answer in 5 s")
            sock.recv_multipart()
            trips.append(time.perf_counter() - t0)
            sends.append(t1 - t0)
        sock.send_multipart([peer, STOP])
    finally:
        stop_pid(proc)
        sock.close(0)
        ctx.term()
    return median(trips) / 2, median(sends)


def store_task(n: int, tmp: Path, url: str | None) -> tuple[float, float]:
    """(one task's rows with its commit, the commit alone), seconds, on the real store (SQLite
    in ``tmp``, or the PostgreSQL of ``url``)."""
    from capsule_actors.store import NewTask, open_store
    from capsule_actors.states import QUEUED, SUCCEEDED

    store = open_store(tmp, url, "bench-hops")
    whole, commits = [], []
    try:
        for i in range(n):
            task_id = f"{os.getpid():08x}{time.time_ns():024x}"
            t0 = time.perf_counter()
            store.begin()
            store.insert_tasks([NewTask(task_id, "noop", QUEUED, None, None, None, b"\x80\x05N.", time.time(), None)])
            store.mark_running(task_id, None, 1, "w0", time.time())
            store.finish(task_id, None, SUCCEEDED, b"\x80\x05N.", None, time.time())
            t1 = time.perf_counter()
            store.commit()
            t2 = time.perf_counter()
            whole.append(t2 - t0)
            commits.append(t2 - t1)
            store.maintain()
    finally:
        store.close()
    return median(whole), median(commits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="samples of each (default 3000)")
    parser.add_argument("--store", metavar="URL", help="a postgresql:// URL: the store rows there (default: SQLite)")
    args = parser.parse_args()
    print_machine()
    with temp_dir("cpsl-hops-") as tmp:
        handoff = thread_handoff(args.n)
        pipe = pipe_hop(args.n)
        hop, send = zmq_hop(args.n, tmp)
        task, commit = store_task(args.n, tmp, args.store)
    us = 1e6
    print(f"\n{'median of ' + str(args.n):<34}{'us':>8}")
    print("-" * 42)
    for label, value in (("thread hand-off (one way)", handoff), ("pipe hop between processes", pipe),
                         ("ZeroMQ hop, ipc://", hop), ("  of which the sender's send()", send),
                         ("store: one task's rows + COMMIT", task), ("  of which COMMIT", commit)):
        print(f"{label:<34}{value * us:8.1f}")
    least = 4 * hop + 2 * handoff + task
    print(f"\na round trip with no other work: 4 ZeroMQ hops + 2 thread hand-offs + one task's rows "
          f"= {least * us / 1000:.3f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_echo_pipe":
        _echo_pipe(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_echo_zmq":
        _echo_zmq(sys.argv[2])
    else:
        main()
