"""A worker node: actor processes on another host that join a running supervisor over TCP + CURVE.

``capsule-actors worker MODULE:APP --connect tcp://HOST:PORT --key FILE`` runs one. The node is
a remote arm of the supervisor: it imports the app once into a warm template (the same forkserver
the supervisor uses locally), and forks, signals and reaps actors when the supervisor asks
(``Spawn`` / ``Kill``), reporting ``Spawned`` / ``Exited``. Restart policy, lock routing and task
dispatch stay in the supervisor; the actors connect to its TCP socket themselves, so a task's
messages take one hop, not two.

**The lease.** Every ``PING_INTERVAL`` the node sends ``NodePing(seq)``; the supervisor answers
``Lease(seq)``, and the node's actors may then run until that ping's send time plus the lease
(set by the supervisor in ``NodeWelcome``). The lease's end is kept in an 8-byte file that each
actor watches from a thread (``actors.worker.watch_lease``); the node also SIGKILLs its actors
when it runs out. The supervisor declares a node lost only after hearing nothing for longer than
the lease, and only then retries its tasks elsewhere, so a cut link or a frozen node never runs a
task (or a lock key) twice at once. A fenced node waits for its actors' exits, then says hello
again as a new incarnation.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re
import secrets
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import messages
from .app import App
from .errors import ConfigError, ProtocolError
from .lifecycle import exit_cause
from .supervisor.specs import ROLE_PROCESS, ROLE_WORKER, ChildSpec, local_rss
from .supervisor.template import ActorTemplate
from .transport import (
    HANDSHAKE_EVENTS,
    NODE_NAME_PATTERN,
    NODE_PREFIX,
    Handshakes,
    RemoteEndpoint,
    connect,
    handshake_refusal,
)

log = logging.getLogger("capsule_actors.node")

PING_INTERVAL = 0.5  # seconds between NodePings (each one renews the lease when answered)
HELLO_RETRY = 3.0  # no NodeWelcome this long after a hello: a new socket, a new hello
FENCE_WAIT = 5.0  # how long a fenced node waits for its killed actors' exits before saying hello
EXIT_REFUSED = 2
NODE_ENV = "CAPSULE_NODE"
_LEASE = struct.Struct("=d")


def check_node_name(name: str) -> str:
    if not re.fullmatch(NODE_NAME_PATTERN, name):
        raise ConfigError(
            f"node name {name!r}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


class WorkerNode:
    """One node process: a socket to the supervisor, a template, the actors, and the lease."""

    def __init__(
        self,
        app: App,
        endpoint: RemoteEndpoint,
        key_path: Path,
        *,
        name: str | None = None,
        workers: int | None = None,
        process_workers: int | None = None,
        grace: float | None = None,
    ) -> None:
        cpus = os.cpu_count() or 1
        self.app = app
        self.endpoint = endpoint
        self.key_path = key_path
        self.name = check_node_name(name or endpoint.key_name)  # a key is bound to its name
        self.workers = cpus if workers is None else workers
        self.process_workers = cpus if process_workers is None else process_workers
        if not (0 <= self.workers <= 256 and 0 <= self.process_workers <= 256) or not (
            self.workers + self.process_workers
        ):
            raise ConfigError(
                f"--workers {self.workers} --process-workers {self.process_workers}: each "
                "must be 0-256 and together at least 1"
            )
        self.grace = app.grace if grace is None else grace
        self.sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self.monitor: zmq.Socket | None = None  # type: ignore[type-arg]  # the handshake's outcome
        self.handshakes = Handshakes()
        self.joined = False
        self.hello_at = 0.0
        self.unanswered = False  # a hello went unanswered since the last join (warned once)
        self.lease = 0.0  # seconds, from NodeWelcome
        self.lease_until = 0.0
        self.next_ping = 0.0
        self.pings: dict[int, float] = {}  # seq -> monotonic send time
        self.seq = itertools.count(1)
        self.actors: dict[str, tuple[int, int]] = {}  # slot -> (gen, pid)
        self.fenced: set[int] = set()  # pids killed by a fence, exits not seen yet
        self.fenced_at = 0.0
        self.stopping = False
        self.stop_deadline = 0.0

    # ---- life cycle --------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (graceful: running tasks finish) or a fatal refusal."""
        self.run_dir = Path(tempfile.mkdtemp(prefix="capsule-node-"))  # 0700
        self.lease_path = self.run_dir / "lease"
        self.lease_path.write_bytes(_LEASE.pack(0.0))
        fd = os.open(self.lease_path, os.O_RDWR)
        self.lease_map = mmap.mmap(fd, _LEASE.size)
        os.close(fd)
        os.environ[NODE_ENV] = self.name  # a task can tell which node it runs on (its actors inherit it)
        self.sig_r, self.sig_w = socket.socketpair()
        self.sig_r.setblocking(False)
        self.sig_w.setblocking(False)
        signal.set_wakeup_fd(self.sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.ctx = zmq.Context()
        self.template = ActorTemplate(cloudpickle.dumps(self.app, protocol=5), sys.path)
        log.info(
            "node %s (pid %d): %d workers, %d process workers, supervisor %s",
            self.name,
            os.getpid(),
            self.workers,
            self.process_workers,
            self.endpoint.address,
        )
        try:
            return self._loop()
        finally:
            self._kill_actors(signal.SIGKILL)
            self.template.close()
            if self.monitor is not None:
                self.monitor.close(0)
            if self.sock is not None:
                self.sock.close(linger=500)
            self.ctx.term()
            signal.set_wakeup_fd(-1)
            self.lease_map.close()
            self.lease_path.unlink(missing_ok=True)
            self.run_dir.rmdir()

    def _loop(self) -> int:
        while True:
            now = time.monotonic()
            if self.sock is None and (not self.fenced or now - self.fenced_at > FENCE_WAIT) and not self.stopping:
                self._hello()
            poller = zmq.Poller()
            poller.register(self.sig_r.fileno(), zmq.POLLIN)
            poller.register(self.template.fd, zmq.POLLIN)
            if self.sock is not None:
                poller.register(self.sock, zmq.POLLIN)
            if self.monitor is not None:
                poller.register(self.monitor, zmq.POLLIN)
            ready = dict(poller.poll(100 if self.template.pending() else 50))
            if self.monitor is not None and self.monitor in ready:
                code = self._on_handshake()
                if code is not None:
                    return code
            if self.sig_r.fileno() in ready:
                code = self._on_signals()
                if code is not None:
                    return code
            self._on_template_events()
            if self.sock is not None and self.sock in ready:
                code = self._drain()
                if code is not None:
                    return code
            if self._tick(time.monotonic()):
                return 0

    def _tick(self, now: float) -> bool:
        """Ping, fence when the lease ran out, retry an unanswered hello; True when done stopping."""
        if self.joined and now >= self.next_ping:
            self._ping(now)
        if self.joined and now > self.lease_until:
            self._fence(f"no Lease from the supervisor for {now - self.lease_until + self.lease:.1f} s")
        elif self.sock is not None and not self.joined and now - self.hello_at > HELLO_RETRY:
            if not self.unanswered:  # once until it joins: a supervisor that is down says nothing either
                from . import __version__

                log.warning(
                    "node %s: no answer to its hello from %s in %.0f s; trying again (is the supervisor "
                    "up, does it authorize this key, and does it run capsule_actors %s?)",
                    self.name,
                    self.endpoint.address,
                    HELLO_RETRY,
                    __version__,
                )
            self.unanswered = True
            self._close_socket()  # no answer: try again with a fresh connection
        if self.stopping and (not self.actors or now > self.stop_deadline):
            if self.actors:
                log.warning("node %s: %d actors did not stop in time; killing them", self.name, len(self.actors))
            return True
        return False

    def _on_signals(self) -> int | None:
        try:
            sigs = set(self.sig_r.recv(4096))
        except BlockingIOError:
            return None
        if signal.SIGCHLD in sigs and not self.template.alive():
            self._replace_template()
        if sigs & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            if self.stopping:
                log.warning("node %s: second stop signal; killing the actors now", self.name)
                return 0
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.grace + 5.0
            log.info("node %s stopping: running tasks get %.1f s to finish", self.name, self.grace)
            if self.joined and self.sock is not None:
                self.sock.send_multipart([messages.NodeBye(self.grace).encode()])
            else:
                return 0
        return None

    def _replace_template(self) -> None:
        log.error(
            "node %s: the actor template died with %s; its actors died with it",
            self.name,
            exit_cause(self.template.popen.returncode or 0),
        )
        self._on_template_events()
        for slot, (gen, _pid) in list(self.actors.items()):
            self._exited(slot, gen, -signal.SIGKILL)
        self.template.close(0)
        self.template = ActorTemplate(cloudpickle.dumps(self.app, protocol=5), sys.path)

    # ---- the connection ----------------------------------------------------------------------
    def _hello(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.identity = NODE_PREFIX + f"{self.name}/{secrets.token_hex(4)}".encode()
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = 0
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        connect(
            sock,
            self.endpoint.address,
            self.endpoint.server_public,
            (self.endpoint.client_public, self.endpoint.client_secret),
        )
        self.sock = sock
        self.hello_at = time.monotonic()
        tasks = sorted(self.app.tasks)
        sock.send_multipart(
            [
                messages.NodeHello(
                    self.name,
                    self.app.name,
                    tasks,
                    self.workers,
                    self.process_workers,
                    socket.gethostname(),
                    os.getpid(),
                    messages.PROTOCOL,
                ).encode()
            ]
        )

    def _on_handshake(self) -> int | None:
        """A refused CURVE handshake is for good (the key, or the server key, is wrong): exit 2."""
        assert self.monitor is not None
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if not self.handshakes.refused(event):
                continue
            why = handshake_refusal(event, self.endpoint)
            log.error("node %s: %s", self.name, why)
            print(f"capsule-actors worker: {why}", file=sys.stderr)
            return EXIT_REFUSED
        return None

    def _close_socket(self) -> None:
        if self.monitor is not None:
            if self.sock is not None:
                self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = None
        self.joined = False
        self.pings.clear()

    def _drain(self) -> int | None:
        assert self.sock is not None
        while self.sock is not None:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                code = self._on_message(messages.decode(frames[0]))
            except ProtocolError as exc:
                log.warning("node %s: dropped a malformed message from the supervisor: %s", self.name, exc)
                continue
            if code is not None:
                return code
        return None

    def _on_message(self, msg: messages.Message) -> int | None:
        if isinstance(msg, messages.Lease):
            sent = self.pings.pop(msg.seq, None)
            for seq in [s for s in self.pings if s < msg.seq]:
                del self.pings[seq]
            if sent is not None:
                self._renew(sent + self.lease)
        elif isinstance(msg, messages.Spawn):
            self._spawn(msg)
        elif isinstance(msg, messages.Kill):
            gen_pid = self.actors.get(msg.slot)
            if gen_pid is not None and gen_pid[0] == msg.gen:
                try:
                    os.kill(gen_pid[1], msg.signal)
                except (ProcessLookupError, ValueError):
                    pass
        elif isinstance(msg, messages.NodeWelcome):
            if not self.joined:
                self.joined = True
                self.unanswered = False
                self.lease = float(msg.config["lease"])
                self._renew(self.hello_at + self.lease)
                self.next_ping = 0.0
                log.info(
                    "node %s joined the supervisor at %s (lease %.1f s)", self.name, self.endpoint.address, self.lease
                )
        elif isinstance(msg, messages.NodeRefused):
            if msg.fatal:
                log.error("node %s: the supervisor refused it: %s", self.name, msg.reason)
                print(f"capsule-actors worker: refused by the supervisor: {msg.reason}", file=sys.stderr)
                return EXIT_REFUSED
            self._fence(msg.reason)
        return None

    def _ping(self, now: float) -> None:
        assert self.sock is not None
        seq = next(self.seq)
        self.pings[seq] = now
        rss = {slot: local_rss(pid) for slot, (_gen, pid) in self.actors.items()}
        self.sock.send_multipart([messages.NodePing(seq, rss).encode()])
        self.next_ping = now + PING_INTERVAL

    def _renew(self, until: float) -> None:
        if until > self.lease_until:
            self.lease_until = until
            _LEASE.pack_into(self.lease_map, 0, until)

    def _fence(self, why: str) -> None:
        """Lost the supervisor: kill every actor now (their tasks are retried elsewhere once the
        supervisor declares this node lost), then join again as a new incarnation."""
        log.error("node %s lost the supervisor (%s): killing its %d actors", self.name, why, len(self.actors))
        self.lease_until = 0.0
        _LEASE.pack_into(self.lease_map, 0, 0.0)
        self.fenced.update(pid for _gen, pid in self.actors.values())
        self.fenced_at = time.monotonic()
        self._kill_actors(signal.SIGKILL)
        self.actors.clear()
        self._close_socket()

    # ---- actors ------------------------------------------------------------------------------
    def _spawn(self, msg: messages.Spawn) -> None:
        if msg.role not in (ROLE_WORKER, ROLE_PROCESS) or msg.slot in self.actors or self.stopping:
            self._send(messages.Exited(msg.slot, msg.gen, -signal.SIGKILL))
            return
        spec = ChildSpec(msg.slot, msg.role, 1, self.grace, node=self.name)
        proc = self.template.spawn(
            spec,
            msg.gen,
            self.endpoint.address,
            self.endpoint.server_public,
            "",
            client_keys=[self.endpoint.client_public, self.endpoint.client_secret],
            lease_file=str(self.lease_path),
        )
        if proc is None:
            self._send(messages.Exited(msg.slot, msg.gen, -signal.SIGKILL))
            return
        self.actors[msg.slot] = (msg.gen, proc.pid)
        self._send(messages.Spawned(msg.slot, msg.gen, proc.pid))

    def _on_template_events(self) -> None:
        for event in self.template.events():
            if event.get("op") != "exit":
                continue
            pid = event["pid"]
            if pid in self.fenced:
                self.fenced.discard(pid)
                continue
            for slot, (gen, actor_pid) in list(self.actors.items()):
                if actor_pid == pid:
                    self._exited(slot, gen, int(event["code"]))

    def _exited(self, slot: str, gen: int, code: int) -> None:
        del self.actors[slot]
        if code != 0:
            log.warning("node %s: actor %s exited with %s", self.name, slot, exit_cause(code))
        self._send(messages.Exited(slot, gen, code))

    def _send(self, msg: messages.Message) -> None:
        if self.sock is not None and self.joined:
            self.sock.send_multipart([msg.encode()])

    def _kill_actors(self, sig: int) -> None:
        for _gen, pid in self.actors.values():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
