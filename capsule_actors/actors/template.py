"""The warm actor template: a forkserver that imported the app once and forks actors on request.

A fresh interpreter that imports zmq, cloudpickle and the app costs 100+ ms; a fork of this
process costs a few. The supervisor starts one template, sends it the cloudpickled App on stdin,
then asks it for actors with JSON lines (``{"op": "spawn", "actor": {...}}``). The template
answers on ``--out-fd`` with ``spawned`` (the new pid) and, as it reaps them, ``exit`` (pid and
exit code, negative for a signal). It never creates a ZeroMQ context or an event loop, so a fork
of it starts clean. It dies with the supervisor (PR_SET_PDEATHSIG), and its actors die with it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import select
import signal
import struct
import sys
import time
from typing import Any

import cloudpickle

from ..lifecycle import EXIT_ERROR, die_with_parent
from .worker import ActorArgs, run_actor

_SIZE = struct.Struct("!Q")


class Template:
    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.children: set[int] = set()
        self.lease_until: float | None = None  # a cluster member's lease (monotonic): past it, stop all
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(self, event: dict[str, Any]) -> None:
        os.write(self.out_fd, (json.dumps(event) + "\n").encode())

    def spawn(self, app: Any, spec: dict[str, Any]) -> None:
        args = ActorArgs(parent=os.getpid(), **spec)
        pid = os.fork()
        if pid == 0:  # the new actor
            try:
                self._become_actor()
                run_actor(args, app)
            finally:
                os._exit(EXIT_ERROR)
        self.children.add(pid)
        self.send({"op": "spawned", "slot": args.slot, "gen": args.gen, "pid": pid})

    def _become_actor(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (self.out_fd, self.sig_r, self.sig_w):
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        random.seed()  # forked actors must not share one random sequence
        gc.unfreeze()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def serve(self, app: Any) -> None:
        buffer = b""
        while True:
            timeout = None if self.lease_until is None else max(0.0, self.lease_until - time.monotonic())
            ready, _, _ = select.select([0, self.sig_r], [], [], timeout)
            if self.lease_until is not None and time.monotonic() >= self.lease_until:
                self._fence()
                return
            if self.sig_r in ready:
                while True:
                    try:
                        if not os.read(self.sig_r, 4096):
                            break
                    except BlockingIOError:
                        break
                self.reap()
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    return  # the supervisor closed our stdin: it is stopping
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    command = json.loads(line)
                    if command.get("op") == "spawn":
                        self.spawn(app, command["actor"])
                    elif command.get("op") == "lease":
                        self.lease_until = float(command["until"])

    def _fence(self) -> None:
        """The cluster member's lease ran out without renewal (its supervisor is frozen or cut
        off): another member may take its tasks over, so none of ours may run any more."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sys.stderr.write("capsule_actors template: the cluster lease ran out; every actor was killed\n")

    def stop_children(self, grace: float = 2.0) -> None:
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _read_exact(n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            raise SystemExit("the supervisor closed the template's stdin before sending the app")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capsule_actors.actors.template")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--out-fd", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor
    (size,) = _SIZE.unpack(_read_exact(_SIZE.size))
    app = cloudpickle.loads(_read_exact(size))  # the app's imports are paid here, once
    gc.collect()
    gc.freeze()  # keep the heap shared copy-on-write with every forked actor
    template = Template(args.out_fd)
    template.send({"op": "ready", "pid": os.getpid()})
    try:
        template.serve(app)
    finally:
        template.stop_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
