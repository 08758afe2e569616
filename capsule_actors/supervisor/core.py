"""The supervisor loop: one thread, one transaction per turn, replies only after the commit.

Each turn: poll the client socket, the actor socket and the signal fd; handle every message that
is waiting (submits, waits, results, heartbeats, child exits); run due timers; dispatch queued
tasks to actors with room; COMMIT; then send the acks, dispatches and results of that turn.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import heapq
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from .. import journal, messages
from ..app import App, new_task_id
from ..errors import (
    AlreadyRunning,
    Backpressure,
    CapsuleError,
    CapsuleInternalError,
    ConfigError,
    ProtocolError,
    StateDirError,
    WorkerCrashed,
)
from ..store import Store
from ..transport import (
    DB_FILE,
    LOCK_FILE,
    NODE_PREFIX,
    RuntimeFile,
    bind,
    ensure_state_dir,
    local_endpoint,
    pid_alive,
    private_umask,
    read_runtime_file,
    remove_runtime_file,
    write_runtime_file,
)
from .children import (
    ROLE_CLOCK,
    ROLE_PROCESS,
    ROLE_WORKER,
    WORKER_CONCURRENCY,
    ActorProcess,
    ActorTemplate,
    ChildSpec,
    RestartIntensity,
    actor_status,
    exit_cause,
    kill,
    local_rss,
)
from .nodes import NODE_CHECK, NODE_LOSS, NodeLink
from .router import owner

log = logging.getLogger("capsule_actors.supervisor")

HEARTBEAT_TIMEOUT = 15.0  # an actor silent this long is hung: kill and restart it
HEARTBEAT_CHECK = 1.0
SPAWN_TIMEOUT = 30.0  # a node's actor that has not said hello this long after its Spawn is replaced
DRAIN_LIMIT = 2000  # messages per socket per turn, so one flood cannot starve the rest
KILL_GRACE = 1.0  # SIGTERM -> SIGKILL for a process actor that is cancelled or timed out
EVENT_RETENTION = 7 * 24 * 3600.0  # events older than this are pruned (task records are kept)
EVENT_MAX_ROWS = 1_000_000  # and at most this many events are kept
EVENT_PRUNE_INTERVAL = 60.0
MEMORY_CHECK = 1.0  # how often a running process actor's RSS is compared with max_process_memory_mb
QUEUE_WINDOW = 10_000  # queued unlocked tasks held in memory; more wait in SQLite only (the backlog)
LAZY_COMMIT = 0.002  # seconds a dispatch's RUNNING rows may wait for the next turn's commit
JOURNAL_SWEEP = 1.0  # how often the submit journals of clients that died are looked for
STATES = ("QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")

Frames = list[bytes]
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_REMOTE = b"\x01tcp:"  # prefix of remote client identities (local ROUTER identities start with 0)
_NO_ARGS = pickle.dumps(((), {}), protocol=5)  # a scheduled firing's arguments (none)


class LiveTask:
    """A task that is queued, scheduled or running: held in memory until it ends."""

    __slots__ = (
        "actor",
        "attempts",
        "blocked",
        "id",
        "lock_key",
        "name",
        "owner",
        "run_at",
        "session_id",
        "session_owner",
        "state",
        "waiters",
    )

    def __init__(self, task_id: str, name: str, state: str, attempts: int, lock_key: str | None,
                 session_id: str | None, session_owner: str | None,
                 owner: str | None = None, blocked: bool = False, run_at: float | None = None) -> None:
        self.id = task_id
        self.name = name
        self.state = state
        self.attempts = attempts
        self.lock_key = lock_key
        self.session_id = session_id
        self.session_owner = session_owner
        self.actor: ActorProcess | None = None
        self.waiters: list[tuple[bytes, int]] = []
        self.owner = owner  # the slot that owns the lock key (and runs the task)
        self.blocked = blocked  # queued behind the key's holder (on_conflict="queue")
        self.run_at = run_at


class PendingSubmit:
    """A Submit whose locked items wait for their owner actors' admission decisions."""

    __slots__ = ("fire", "ident", "journaled", "push", "remaining", "req", "results")

    def __init__(self, ident: bytes, req: int, size: int, fire: tuple[str, float] | None = None,
                 push: list[int] | None = None, journaled: bool = False) -> None:
        self.ident = ident
        self.journaled = journaled  # durable in the client's journal: its ack may wait for any commit
        self.req = req
        self.results: list[list[Any] | None] = [None] * size
        self.remaining = 0
        self.fire = fire  # (schedule name, slot) when the clock fired it
        self.push = push or []  # per item: the client's request id for its outcome


class Supervisor:
    """Owns the state directory, the store, the sockets and every actor process."""

    def __init__(self, app: App, registry: bytes, state_dir: Path, *, workers: int | None = None,
                 process_workers: int | None = None, grace: float | None = None,
                 ready_fd: int | None = None, bind_tcp: str | None = None,
                 keys_dir: Path | None = None) -> None:
        cpus = os.cpu_count() or 1
        self.app = app
        self.registry = registry
        self.state_dir = state_dir
        self.grace = app.grace if grace is None else grace
        self.ready_fd = ready_fd
        self.bind_tcp = bind_tcp
        self.keys_dir = keys_dir
        self.remote_sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self.authenticator: Any = None
        n_workers = workers or app.workers or cpus
        n_process = process_workers or app.process_workers or cpus
        self.specs = [ChildSpec(f"w{i}", ROLE_WORKER, WORKER_CONCURRENCY, self.grace) for i in range(n_workers)]
        self.specs += [ChildSpec(f"p{i}", ROLE_PROCESS, 1, self.grace, max_tasks=app.max_tasks_per_process or 0)
                       for i in range(n_process)]
        self.specs.append(ChildSpec("c0", ROLE_CLOCK, 1, self.grace))
        self.wake_clock = False
        self.procs: dict[str, ActorProcess] = {}  # slot -> live incarnation
        self.by_identity: dict[bytes, ActorProcess] = {}
        self.intensity = {s.slot: RestartIntensity(app.max_restarts, app.restart_window) for s in self.specs}
        self.template_intensity = RestartIntensity(app.max_restarts, app.restart_window)
        self.template: ActorTemplate | None = None
        self.restarts = dict.fromkeys((s.slot for s in self.specs), 0)
        self.last_exit: dict[str, str | None] = dict.fromkeys(s.slot for s in self.specs)
        self.backoff_until: dict[str, float | None] = dict.fromkeys(s.slot for s in self.specs)
        self.gens = itertools.count(1)
        self.live: dict[str, LiveTask] = {}
        self.ready = {ROLE_WORKER: collections.deque[str](), ROLE_PROCESS: collections.deque[str]()}
        self.pools = {role: [s.slot for s in self.specs if s.role == role] for role in self.ready}
        self.slot_ready = {s.slot: collections.deque[str]() for s in self.specs}  # locked tasks
        self.pending_admits: dict[str, list[list[str]]] = {s.slot: [] for s in self.specs}
        self.admissions: dict[str, tuple[PendingSubmit, int, tuple[Any, ...]]] = {}
        self.abandoned_keys: dict[str, LiveTask] = {}  # cancelled/timed-out locked tasks still unwinding
        self.waiter_index: dict[tuple[bytes, int], str] = {}
        # long polls of h.events() ("t", task id) and app.subscribe() ("s", session id)
        self.event_waiters: dict[tuple[str, str], list[tuple[bytes, int, int]]] = {}
        self.crash_plan: dict[str, set[int]] = {}
        self.timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.timer_seq = itertools.count()
        self.outbox: list[tuple[zmq.Socket, Frames]] = []  # type: ignore[type-arg]
        self.after_commit: list[tuple[zmq.Socket, Frames]] = []  # type: ignore[type-arg]  # journaled acks
        self.stopping = False
        self.started_attempts = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.parked: dict[str, list[tuple[bytes, int]]] = {}  # waits on tasks held in the store only
        self.lazy_commit_at: float | None = None
        self.node_link = NodeLink(self)  # worker nodes on other machines
        # Unlocked QUEUED tasks beyond QUEUE_WINDOW stay in the store only: all of them have a
        # rowid above backlog_after, and _page_in loads them in submit order as the queue drains.
        self.backlog = 0
        self.backlog_after = 0
        self.rekeying = False  # the pools changed: admissions wait until every owner has the new keys
        self.held_admits: list[list[str]] = []
        self.started_at = time.time()
        self.announced_ready = False
        self.dropped = 0

    # ---- life cycle --------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and a graceful stop; return the process exit code."""
        try:
            try:
                self._setup()
            except OSError as exc:  # full or read-only disk, and the like: say so, plainly
                raise StateDirError(f"cannot set up the state directory {str(self.state_dir)!r}: "
                                    f"{exc.strerror or exc}") from None
        except CapsuleError as exc:
            self._announce(f"error {type(exc).__name__}: {exc}")
            raise
        try:
            self.store.begin()
            self.store.register_schedules(((s.name, s.cron, s.tz) for s in self.app.schedules.values()), time.time())
            self._recover()
            self._replay_journals()
            self.store.commit()
            self.finished = collections.Counter(
                {k: v for k, v in self.store.counts().items() if k in ("SUCCEEDED", "FAILED", "CANCELLED")})
            self._start_template()
            for spec in self.specs:
                self._start_actor(spec)
            self._add_timer(HEARTBEAT_CHECK, self._check_heartbeats)
            self._add_timer(NODE_CHECK, self.node_link.check)
            self._add_timer(1.0, self._prune_events)
            if self.app.max_process_memory_mb:
                self._add_timer(MEMORY_CHECK, self._check_memory)
            self._add_timer(30.0, self._announce_ready)  # ready even if an actor never says hello
            while not (self.stopping and not self.procs):
                self._turn()
        finally:
            self._teardown()
        log.info("supervisor stopped")
        return 0

    def _setup(self) -> None:
        ensure_state_dir(self.state_dir)
        self._lock_fd = self._take_lock()
        with private_umask():
            self.store = Store(self.state_dir / DB_FILE)
        self.ctx = zmq.Context()
        self.client_sock = self._router()
        self.actor_sock = self._router()
        client_ep = local_endpoint(self.state_dir, "client")
        actor_ep = local_endpoint(self.state_dir, "actor")
        if actor_ep.server_secret:  # one key pair for both sockets keeps supervisor.json small
            actor_ep = dataclasses.replace(actor_ep, server_public=client_ep.server_public,
                                           server_secret=client_ep.server_secret)
        self.client_addr = bind(self.client_sock, client_ep)
        self.actor_addr = bind(self.actor_sock, actor_ep)
        self.server_public = client_ep.server_public
        if self.bind_tcp:
            self._bind_remote()
        self.sig_r, self.sig_w = socket.socketpair()
        self.sig_r.setblocking(False)
        self.sig_w.setblocking(False)
        signal.set_wakeup_fd(self.sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        self.poller = zmq.Poller()
        self.poller.register(self.client_sock, zmq.POLLIN)
        self.poller.register(self.actor_sock, zmq.POLLIN)
        if self.remote_sock is not None:
            self.poller.register(self.remote_sock, zmq.POLLIN)
        self.poller.register(self.sig_r.fileno(), zmq.POLLIN)
        write_runtime_file(self.state_dir, RuntimeFile(
            pid=os.getpid(), client=self.client_addr, actor=self.actor_addr,
            server_public=self.server_public, started_at=self.started_at, state_dir=str(self.state_dir)))
        log.info("supervisor pid %d serving %s on %s", os.getpid(), self.state_dir, self.client_addr)

    def _bind_remote(self) -> None:
        """``--bind tcp://H:P``: a second client socket, CURVE-encrypted, that only admits the
        client keys in KEYS/authorized/ (checked by pyzmq's ZAP authenticator)."""
        from zmq.auth.thread import ThreadAuthenticator

        from ..transport import AUTHORIZED_DIR, SERVER_KEY, load_keys

        if not self.bind_tcp or not self.bind_tcp.startswith("tcp://"):
            raise ConfigError(f"--bind {self.bind_tcp!r}: expected tcp://HOST:PORT")
        keys = self.keys_dir or self.state_dir / "keys"
        public, secret = load_keys(keys, SERVER_KEY)
        authorized = keys / AUTHORIZED_DIR
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise StateDirError(f"no authorized client keys in {str(authorized)!r}: run `capsule-actors keys DIR`")
        self.authenticator = ThreadAuthenticator(self.ctx)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(authorized))
        sock = self._router()
        sock.curve_server = True
        sock.curve_secretkey = secret.encode()
        sock.curve_publickey = public.encode()
        sock.bind(self.bind_tcp)
        self.remote_sock = sock
        log.info("remote clients: %s (CURVE, keys authorized in %s)", self.bind_tcp, authorized)

    def _take_lock(self) -> int:
        path = self.state_dir / LOCK_FILE
        try:
            with private_umask():
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot create pid lock {str(path)!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_runtime_file(self.state_dir)
            who = f"pid {other.pid}" if other else "another process"
            raise AlreadyRunning(
                f"a supervisor ({who}) is already running on {str(self.state_dir)!r}; stop it first "
                "or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _router(self) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.maxmsgsize = self.app.max_payload_bytes + (1 << 16)  # oversized frames are dropped
        return sock

    def _teardown(self) -> None:
        for proc in list(self.procs.values()):
            self._kill(proc)
        self.node_link.stop()
        if self.template is not None:
            self.template.close()
        if hasattr(self, "store"):
            try:
                self._commit()
            finally:
                self.store.close()
        if hasattr(self, "ctx"):
            self._flush()
            self.client_sock.close(linger=200)
            if self.remote_sock is not None:
                self.remote_sock.close(linger=200)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.actor_sock.close(0)
            self.ctx.term()
            for addr in (self.client_addr, self.actor_addr):
                if addr.startswith("ipc://"):
                    Path(addr[len("ipc://"):]).unlink(missing_ok=True)
            signal.set_wakeup_fd(-1)
            remove_runtime_file(self.state_dir, os.getpid())
        if hasattr(self, "_lock_fd"):
            os.close(self._lock_fd)

    def _announce(self, line: str) -> None:
        """Tell the process that started us (embedded mode) that we are ready or failed."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, (line + "\n").encode())
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def _announce_ready(self) -> None:
        if not self.announced_ready:
            self.announced_ready = True
            self._announce("ready")

    # ---- the loop ----------------------------------------------------------------------------
    def _turn(self) -> None:
        timeout = None
        if self.timers:
            timeout = max(0.0, (self.timers[0][0] - time.monotonic()) * 1000)
        if self.lazy_commit_at is not None:
            lazy = max(0.0, (self.lazy_commit_at - time.monotonic()) * 1000)
            timeout = lazy if timeout is None else min(timeout, lazy)
        ready = dict(self.poller.poll(None if timeout is None else int(timeout) + 1))
        self.store.begin()
        self._handle(ready)
        # Commit, then send, whenever this turn has something to say (acks, results, events, the
        # clock's wake-up): everything acknowledged is durable. A turn with nothing to say (say,
        # results nobody waits for) leaves its writes to the next commit, at most LAZY_COMMIT away.
        lazy_due = self.lazy_commit_at is not None and time.monotonic() >= self.lazy_commit_at
        if self.outbox or self.wake_clock or self.event_waiters or self.stopping or lazy_due:
            self._commit_and_send()
        elif self.lazy_commit_at is None and self.store.dirty():
            self.lazy_commit_at = time.monotonic() + LAZY_COMMIT
        # Dispatch after the acks. The Run messages may go out before this turn's writes commit
        # (their own RUNNING rows, a journaled submit's insert, results nobody waits for): a crash
        # in between leaves those tasks QUEUED or RUNNING in the store (or in a client's
        # journal), to be run again, which at-least-once allows; their actors die with the
        # supervisor anyway, a node's with its lease. Never before a schedule's fired slot: that
        # must be durable before its task runs, or a restart would fire the slot again.
        held_back = self.store.slot_pending
        self.store.begin()
        if self._dispatch():
            if held_back:
                self._commit()
            self._flush()
            if self.lazy_commit_at is None and self.store.dirty():  # they ride the next commit
                self.lazy_commit_at = time.monotonic() + LAZY_COMMIT
        elif self.lazy_commit_at is None:
            self._commit()
            self._flush()
            self.store.checkpoint_if_needed()

    def _handle(self, ready: dict[Any, int]) -> None:
        """Everything that is waiting: signals, child exits, messages, due timers."""
        if self.sig_r.fileno() in ready:
            self._on_signals()
        if self.template is not None and (self.template.fd in ready or self.template.pending()):
            self._on_template_events()
        if self.actor_sock in ready:
            self._drain(self.actor_sock, self._on_actor)
        if self.client_sock in ready:
            self._drain(self.client_sock, self._on_client)
        if self.remote_sock is not None and self.remote_sock in ready:
            self._drain(self.remote_sock, self._on_remote)
        self._run_timers()
        if self.rekeying:
            self._finish_rekey()

    def _commit(self) -> None:
        """Commit; the acks that were waiting for any commit can go with the next flush."""
        self.lazy_commit_at = None
        self.store.commit()
        self.outbox += self.after_commit
        self.after_commit.clear()

    def _commit_and_send(self) -> None:
        self._commit()
        self._answer_event_waiters()
        if self.wake_clock:
            self._wake_clock()
        self._flush()
        self.store.checkpoint_if_needed()

    def _wake_clock(self) -> None:
        clock = self.procs.get("c0")
        if clock is not None and clock.ready:
            self.wake_clock = False
            self._send_actor(clock, messages.Wake("scheduled").encode())

    def _drain(self, sock: zmq.Socket, handle: Callable[[Frames], None]) -> None:  # type: ignore[type-arg]
        for _ in range(DRAIN_LIMIT):
            if not int(sock.getsockopt(_EVENTS)) & _POLLIN:  # cheaper than ending on zmq.Again
                return
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except ProtocolError as exc:
                self.dropped += 1
                if self.dropped <= 10 or self.dropped % 1000 == 0:
                    log.warning("dropped a malformed message (%d so far): %s", self.dropped, exc)
            except Exception:  # our bug: log it and keep serving everyone else
                log.exception("internal error while handling a message; the supervisor goes on")

    def _flush(self) -> None:
        for sock, frames in self.outbox:
            last = len(frames) - 1
            try:  # plain int flags: pyzmq's send_multipart spends more on flag enums than on sending
                for i, frame in enumerate(frames):
                    sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=False)
            except zmq.ZMQError as exc:  # a peer that vanished: its waits are resent on reconnect
                log.debug("send failed: %s", exc)
        self.outbox.clear()

    def _add_timer(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), fn, args))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self.timers)
            fn(*args)

    def _reply(self, ident: bytes, req: int, ok: bool, body: Any, frames: Frames = (),  # type: ignore[assignment]
               outbox: list[tuple[zmq.Socket, Frames]] | None = None) -> None:  # type: ignore[type-arg]
        """Queue a reply: in ``outbox`` (sent at this turn's commit), or in ``after_commit``
        (sent at whichever commit comes next, without forcing one)."""
        sock = self.client_sock
        if ident.startswith(_REMOTE) and self.remote_sock is not None:
            sock, ident = self.remote_sock, ident[len(_REMOTE):]
        (self.outbox if outbox is None else outbox).append(
            (sock, [ident, messages.Reply(req, ok, body).encode(), *frames]))

    def _on_remote(self, frames: Frames) -> None:
        """The TCP socket carries remote clients, worker nodes and the nodes' actors."""
        proc = self.by_identity.get(frames[0])
        if proc is not None and proc.spec.node is not None:
            self._on_actor(frames)
        elif frames[0].startswith(NODE_PREFIX):
            self.node_link.on_message(frames)
        else:  # a client: the same handlers, its identity marked for the reply
            self._on_client([_REMOTE + frames[0], *frames[1:]])

    def _send_actor(self, proc: ActorProcess, *frames: bytes) -> None:
        sock = self.actor_sock if proc.spec.node is None else self.remote_sock
        assert sock is not None
        self.outbox.append((sock, [proc.identity, *frames]))

    def _kill(self, proc: ActorProcess, sig: int = signal.SIGKILL) -> None:
        """Signal an actor: ours by pid, a node's through its node."""
        if proc.spec.node is None:
            kill(proc, sig)
            return
        node = self.node_link.get(proc.spec.node)
        if node is not None:
            self.node_link.send(node.identity, messages.Kill(proc.spec.slot, proc.gen, sig))

    def _error(self, ident: bytes, req: int, exc: CapsuleError) -> None:
        self._reply(ident, req, False, [type(exc).__name__, str(exc)])

    # ---- signals and children ----------------------------------------------------------------
    def _on_signals(self) -> None:
        try:
            data = self.sig_r.recv(4096)
        except BlockingIOError:
            return
        sigs = set(data)
        if signal.SIGCHLD in sigs:
            self._reap()
        if sigs & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            self._begin_stop()

    def _reap(self) -> None:
        """SIGCHLD: our only child is the template (actors are its children; it reports them)."""
        template = self.template
        if template is None or template.alive():
            return
        log.error("the actor template (pid %d) died with %s; its actors die with it",
                  template.pid, exit_cause(template.popen.returncode))
        self._on_template_events()
        self.poller.unregister(template.fd)
        template.close(0)
        self.template = None
        for proc in list(self.procs.values()):
            if proc.spec.node is None:  # a node's actors are its template's children, not ours
                self._on_exit(proc, -signal.SIGKILL)
        if not self.stopping:
            delay = self.template_intensity.next_delay(time.monotonic())
            self._add_timer(delay, self._start_template)

    def _start_template(self) -> None:
        if self.template is None and not self.stopping:
            self.template = ActorTemplate(self.registry, sys.path)
            self.poller.register(self.template.fd, zmq.POLLIN)

    def _on_template_events(self) -> None:
        # restarting a slot forks at once and may read more events: loop until none is left
        while self.template is not None:
            events = self.template.events()
            if not events:
                return
            for event in events:
                by_pid = {proc.pid: proc for proc in self.procs.values() if proc.spec.node is None}
                proc = by_pid.get(event.get("pid", -1))
                if event.get("op") == "exit" and proc is not None:
                    self._on_exit(proc, event["code"])

    def _start_actor(self, spec: ChildSpec) -> None:
        if self.stopping or spec.slot in self.procs:
            return
        self.backoff_until[spec.slot] = None
        if spec.node is not None:  # the node forks it; it says Hello on the TCP socket
            node = self.node_link.get(spec.node)
            if node is None or node.leaving or spec not in node.specs:
                return
            gen, now = next(self.gens), time.monotonic()
            remote = ActorProcess(spec, gen, 0, now, f"{spec.slot}.{gen}".encode(), last_seen=now)
            self.procs[spec.slot] = remote
            self.by_identity[remote.identity] = remote
            self.node_link.send(node.identity, messages.Spawn(spec.slot, gen, spec.role))
            return
        proc = None
        if self.template is not None:
            proc = self.template.spawn(spec, next(self.gens), self.actor_addr, self.server_public,
                                       str(self.state_dir))
        if proc is None:  # no template right now: try again once it is back
            self._add_timer(0.2, self._start_actor, spec)
            return
        self.procs[spec.slot] = proc
        self.by_identity[proc.identity] = proc

    def _on_exit(self, proc: ActorProcess, code: int, cause: str | None = None) -> None:
        slot = proc.spec.slot
        del self.procs[slot]
        self.by_identity.pop(proc.identity, None)
        cause = cause or exit_cause(code)
        self.last_exit[slot] = cause
        for item in proc.admitting.values():  # resent to the key's owner (this slot's next incarnation)
            self._admit(item)
        for task_id in proc.abandoned:  # its body died with it: the key is free
            abandoned = self.abandoned_keys.pop(task_id, None)
            if abandoned is not None:
                self._release(abandoned)
        self._settle_attempts(proc, cause)
        if self.stopping:
            return
        if proc.spec.node is not None and self.node_link.leaving(proc.spec.node):
            node = self.node_link.get(proc.spec.node)  # leaving (forgotten once its last actor is gone) or lost
            if node is not None and not any(s.slot in self.procs for s in node.specs):
                self.node_link.forget(node)
            return
        deliberate = proc.stopping  # recycled by us (hard cancel, timeout): not a crash
        if not deliberate:
            self.restarts[slot] += 1
            log.warning("actor %s (pid %d) exited with %s; restarting", slot, proc.pid, cause)
        delay = 0.0 if deliberate else self.intensity[slot].next_delay(time.monotonic())
        if delay:
            log.error("actor %s restarted more than %d times in %.0f s; next restart in %.1f s",
                      slot, self.app.max_restarts, self.app.restart_window, delay)
            self.backoff_until[slot] = time.time() + delay
            self._add_timer(delay, self._start_actor, proc.spec)
        else:
            self._start_actor(proc.spec)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.spec.node is not None:  # a node's actor: its node reports exits, or is lost
                if not proc.ready and now - proc.started > SPAWN_TIMEOUT:
                    self._kill(proc)
                    self._on_exit(proc, -signal.SIGKILL, f"did not say hello within {SPAWN_TIMEOUT:.0f} s")
                elif proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                    log.error("actor %s sent no heartbeat for %.0f s; killing it", proc.spec.slot,
                              now - proc.last_seen)
                    self._kill(proc)
                continue
            if not pid_alive(proc.pid):  # its exit report never came: never leave a dead slot
                proc.missing_checks += 1
                if proc.missing_checks >= 2:
                    log.error("actor %s (pid %d) is gone but its exit was not reported; restarting it",
                              proc.spec.slot, proc.pid)
                    self._on_exit(proc, -signal.SIGKILL)
                continue
            if proc.ready and now - proc.last_seen > HEARTBEAT_TIMEOUT:
                log.error("actor %s (pid %d) sent no heartbeat for %.0f s; killing it",
                          proc.spec.slot, proc.pid, now - proc.last_seen)
                self._kill(proc)
        self._add_timer(HEARTBEAT_CHECK, self._check_heartbeats)

    def _check_memory(self) -> None:
        for proc in list(self.procs.values()):
            if proc.running:
                self._maybe_recycle(proc)
        self._add_timer(MEMORY_CHECK, self._check_memory)

    def _maybe_recycle(self, proc: ActorProcess) -> None:
        """Replace a process actor after max_tasks_per_process tasks or past max_process_memory_mb.
        The recycle is graceful: the attempt it is running finishes first, nothing is lost."""
        if proc.spec.role != ROLE_PROCESS or proc.stopping or not proc.ready:
            return
        reason = None
        max_tasks, max_mb = self.app.max_tasks_per_process, self.app.max_process_memory_mb
        if max_tasks and proc.tasks_done >= max_tasks:
            reason = f"it ran {proc.tasks_done} tasks (max_tasks_per_process={max_tasks})"
        elif max_mb:
            rss = self._rss(proc)
            if rss is None:
                return
            if rss > max_mb * 2**20:
                reason = f"its RSS is {rss / 2**20:.0f} MB (max_process_memory_mb={max_mb})"
        if reason:
            log.info("recycling actor %s (pid %d): %s", proc.spec.slot, proc.pid, reason)
            proc.stopping = True
            self._send_actor(proc, messages.Stop(self.grace).encode())

    def _rss(self, proc: ActorProcess) -> int | None:
        if proc.spec.node is None:
            return local_rss(proc.pid)
        node = self.node_link.get(proc.spec.node)
        return node.rss.get(proc.spec.slot) if node is not None else None

    def _begin_stop(self) -> None:
        if self.stopping:
            log.warning("second stop signal: killing the actors now")
            self._kill_all()
            return
        log.info("stopping: running tasks get %.1f s to finish", self.grace)
        self.stopping = True
        for proc in self.procs.values():
            proc.stopping = True
            if proc.ready:
                self._send_actor(proc, messages.Stop(self.grace).encode())
            else:
                self._kill(proc)
        self._add_timer(self.grace, self._kill_all)

    def _kill_all(self) -> None:
        for proc in self.procs.values():
            self._kill(proc)

    def _settle_attempts(self, proc: ActorProcess, cause: str) -> None:
        """The attempts a dead actor had: the ones it began crashed with it (or, when we are
        stopping, run again at the next start); Runs it held but never began go back uncounted."""
        began = [task_id for task_id in proc.running if proc.began(task_id)]
        if proc.running and not began and not proc.stopping:  # its Started may have died with it
            began = [next(iter(proc.running))]  # the Run it held first is the one it ran
            self._mark_started(proc, began[0])
        for task_id, attempt in reversed(list(proc.running.items())):
            task = self.live.get(task_id)
            if task is None or task.attempts != attempt or task.state != "RUNNING":
                continue
            if task_id not in began:
                self._give_back(task)
            elif self.stopping:
                self._requeue_unfinished(task)
            else:
                error = ("WorkerCrashed", f"actor {proc.spec.slot} (pid {proc.pid}) died with {cause} "
                         f"while running attempt {attempt}", "")
                self._end_attempt(task, "error", error, b"", self.app.tasks[task.name].retryable(WorkerCrashed))

    def _give_back(self, task: LiveTask) -> None:
        """A Run a process actor held but never began: back to the head of its queue, uncounted
        (its row still says QUEUED: an attempt is recorded only once Started)."""
        task.attempts -= 1
        task.state = "QUEUED"
        task.actor = None
        queue = self.slot_ready[task.owner] if task.owner else self.ready[self._role(task)]
        queue.appendleft(task.id)

    def _requeue_unfinished(self, task: LiveTask) -> None:
        """A graceful stop ran out of time: the attempt does not count; run it at next start."""
        task.attempts -= 1
        task.state = "QUEUED"
        task.actor = None
        self.store.requeue(task.id, task.session_id, None, None, attempts=task.attempts)

    # ---- recovery ----------------------------------------------------------------------------
    def _recover(self) -> None:
        now = time.time()
        held: set[str] = set()
        for row in self.store.live_tasks():
            task = LiveTask(row["id"], row["name"], row["state"], row["attempts"], row["lock_key"],
                            row["session_id"], row["session_owner"], run_at=row["run_at"])
            spec = self.app.tasks.get(task.name)
            if spec is not None and task.state == "SCHEDULED" and task.lock_key is None:
                self.wake_clock = True  # stays in the store; the clock hands it over when due
                continue
            if spec is None:
                self.store.finish(task.id, task.session_id, "FAILED", None,
                                  ("UnknownTask", f"the app has no task {task.name!r} any more", ""), now)
                continue
            if task.state == "QUEUED" and task.lock_key is None and (task.run_at or 0) <= now \
                    and self._to_backlog(row["rowid"]):
                continue
            self.live[task.id] = task
            if task.lock_key is not None:
                task.owner = self._owner(task.name, task.lock_key)
                task.blocked = task.lock_key in held  # submit order: the first live one holds it
                held.add(task.lock_key)
            if task.state == "RUNNING":
                if task.attempts < 1 + spec.retries and spec.retryable(WorkerCrashed):
                    task.state = "QUEUED"
                    crashed = ("WorkerCrashed", "the supervisor died while the task was running; re-running it", "")
                    on_node = ":" in (row["slot"] or "")  # a worker node's actor: retry once its lease ran out
                    task.run_at = now + NODE_LOSS if on_node else None
                    self.store.requeue(task.id, task.session_id, task.run_at, crashed)
                else:
                    self._finish(task, "FAILED", b"", ("WorkerCrashed", "the supervisor died while the "
                                                       "task was running and no retry remained", ""))
                    continue
            if not task.blocked:
                self._queue(task, task.run_at)
        if self.live:
            log.info("recovered %d live tasks from the store", len(self.live))

    def _queue(self, task: LiveTask, run_at: float | None) -> None:
        if task.state == "SCHEDULED":  # the clock actor hands it over when it is due
            self.wake_clock = True
            return
        delay = (run_at - time.time()) if run_at else 0.0
        if delay > 0:
            self._add_timer(delay, self._due, task.id)
        else:
            self._due(task.id)

    def _due(self, task_id: str) -> None:
        task = self.live.get(task_id)
        if task is not None and task.state in ("QUEUED", "SCHEDULED") and not task.blocked:
            task.state = "QUEUED"
            queue = self.slot_ready[task.owner] if task.owner else self.ready[self._role(task)]
            queue.append(task_id)

    def _owner(self, name: str, key: str) -> str:
        return owner(key, self.pools[ROLE_PROCESS if self.app.tasks[name].process else ROLE_WORKER])

    def _role(self, task: LiveTask) -> str:
        return ROLE_PROCESS if self.app.tasks[task.name].process else ROLE_WORKER

    # ---- client requests ---------------------------------------------------------------------
    def _on_client(self, frames: Frames) -> None:
        if len(frames) < 2:
            raise ProtocolError("client message without a header frame")
        ident, msg, payload = frames[0], messages.decode(frames[1]), frames[2:]
        handler = self._client_handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{type(msg).__name__} is not a client request")
        try:
            handler(self, ident, msg, payload)
        except CapsuleError as exc:
            self._error(ident, msg.req, exc)  # type: ignore[attr-defined]
        except Exception as exc:
            self._error(ident, msg.req, CapsuleInternalError(f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
            raise

    def _on_submit(self, ident: bytes, msg: messages.Submit, payload: Frames) -> None:
        from ..errors import SerializationError

        if len(payload) != len(msg.items):
            raise ProtocolError(f"Submit has {len(msg.items)} items but {len(payload)} payload frames")
        for item, frame in zip(msg.items, payload):
            self.app.get_task(item[1])
            if len(frame) > self.app.max_payload_bytes:
                raise SerializationError(f"payload of {len(frame)} bytes is over max_payload_bytes")
        if not msg.journaled and len(self.live) + self.backlog + len(msg.items) > self.app.max_queued:
            raise Backpressure(
                f"{len(self.live) + self.backlog} tasks are queued, scheduled or running and this submit adds "
                f"{len(msg.items)}: over max_queued={self.app.max_queued}; retry later or raise App(max_queued=...)")
        self._submit(PendingSubmit(ident, msg.req, len(msg.items), push=msg.push, journaled=msg.journaled),
                     msg.items, payload)

    def _submit(self, pending: PendingSubmit, items: list[list[Any]], payload: Frames) -> None:
        """Record unlocked items now; send locked ones to their owners for admission first."""
        now = time.time()
        rows = []
        for i, ((task_id, name, lock_key, sid, sowner, run_at), frame) in enumerate(zip(items, payload)):
            state = "SCHEDULED" if run_at and run_at > now else "QUEUED"
            row = (task_id, name, state, lock_key, sid, sowner, frame, now, run_at)
            pending.results[i] = [task_id, False, False]
            if lock_key is None or task_id in self.live or self.store.exists(task_id):
                rows.append(row)  # unlocked, or a resent submit that is already recorded
                continue
            pending.remaining += 1
            self.admissions[task_id] = (pending, i, row)
            self._admit([task_id, lock_key, self.app.tasks[name].on_conflict])
        self._record(rows, None, False)
        if not pending.remaining:
            self._complete(pending)

    def _replay_journals(self) -> None:
        """Record what clients that died left in their submit journals (``journal.py``), through
        the same validation as a Submit; ids already recorded are ignored. Runs every second."""
        replayed = []
        for path, records in journal.orphaned(self.state_dir):
            for frames in records:
                try:
                    msg = messages.decode(frames[0])
                    if not isinstance(msg, messages.Submit):
                        raise ProtocolError(f"{type(msg).__name__} is not a submit")
                    self._on_submit(b"", msg, frames[1:])
                except CapsuleError as exc:
                    log.warning("a submit in journal %s was not recorded: %s", path.name, exc)
            replayed.append(path)
        if replayed:
            self._commit()  # recorded before the journals go
            self.store.begin()
            for path in replayed:
                path.unlink(missing_ok=True)
        self._add_timer(JOURNAL_SWEEP, self._replay_journals)

    def _complete(self, pending: PendingSubmit) -> None:
        """Every item is decided: acknowledge the client, or record the schedule's fired slot."""
        if pending.fire is not None:
            self.store.set_last_slot(*pending.fire)
            return
        if not pending.ident:  # replayed from a journal whose writer is gone: nobody to answer
            return
        for i, result in enumerate(pending.results):
            assert result is not None
            push_req = pending.push[i] if pending.push else None
            task = self.live.get(result[0])
            if push_req is not None and task is not None and not result[2]:  # as if Wait(push_req, id) came now
                task.waiters.append((pending.ident, push_req))
                self.waiter_index[(pending.ident, push_req)] = task.id
                result.append(True)
            else:  # rejected, or in the store only (backlog, delayed): nothing kept in RAM for it
                result.append(False)
        room = max(0, self.app.max_queued - len(self.live) - self.backlog)
        self._reply(pending.ident, pending.req, True, {"items": pending.results, "room": room},
                    outbox=self.after_commit if pending.journaled else self.outbox)

    def _record(self, rows: list[tuple[Any, ...]], slot: str | None, blocked: bool) -> None:
        by_id = {r[0]: r for r in rows}
        for task_id, rowid in self.store.insert_tasks(rows):
            row = by_id[task_id]
            if row[2] == "SCHEDULED" and row[3] is None:
                self.wake_clock = True  # unlocked delayed tasks stay in SQLite until the clock says
                continue
            if row[3] is None and self._to_backlog(rowid):
                continue
            task = LiveTask(task_id, row[1], row[2], 0, row[3], row[4], row[5],
                            owner=slot, blocked=blocked, run_at=row[8])
            self.live[task_id] = task
            if not blocked:
                self._queue(task, row[8])

    def _to_backlog(self, rowid: int) -> bool:
        """Leave a new unlocked QUEUED task in the store only when the in-memory queue is full
        (or a backlog is already waiting: submit order is kept). True when it was left there."""
        if not self.backlog and len(self.ready[ROLE_WORKER]) + len(self.ready[ROLE_PROCESS]) < QUEUE_WINDOW:
            return False
        if not self.backlog:
            self.backlog_after = rowid - 1
        self.backlog += 1
        return True

    def _page_in(self) -> None:
        """Load the oldest backlog tasks once the in-memory queue is half empty."""
        queued = len(self.ready[ROLE_WORKER]) + len(self.ready[ROLE_PROCESS])
        if not self.backlog or queued > QUEUE_WINDOW // 2:
            return
        limit = QUEUE_WINDOW - queued
        rows = self.store.backlog_rows(self.backlog_after, limit)
        for row in rows:
            self.backlog_after = row["rowid"]
            if row["id"] in self.live:  # e.g. a delayed task that came due: it is already here
                continue
            self.backlog -= 1
            self._load(row, "QUEUED")
            self._due(row["id"])
        if len(rows) < limit:
            self.backlog = 0

    def _load(self, row: Any, state: str) -> LiveTask:
        task = LiveTask(row["id"], row["name"], state, row["attempts"], None, row["session_id"],
                        row["session_owner"], run_at=row["run_at"])
        task.waiters = self.parked.pop(task.id, [])
        self.live[task.id] = task
        return task

    def _load_stored(self, task_id: str) -> LiveTask | None:
        """Bring an unlocked task held only in the store (SCHEDULED, or QUEUED in the backlog)
        into memory: it is due or being cancelled. The waits parked on it come along."""
        if task_id in self.live:
            return self.live[task_id]
        row = self.store.live_row(task_id)
        if row is None or row["state"] not in ("SCHEDULED", "QUEUED") or row["lock_key"] is not None:
            return None
        if row["state"] == "QUEUED":
            self.backlog -= 1
        return self._load(row, row["state"])

    def _admit(self, item: list[str]) -> None:
        """Ask the key's owner actor to decide ``[task_id, key, policy]``; hold the request while
        that actor is down, or while the pools are being re-keyed."""
        entry = self.admissions.get(item[0])
        if entry is None:
            return  # decided already
        if self.rekeying:
            self.held_admits.append(item)
            return
        slot = self._owner(entry[2][1], item[1])
        proc = self.procs.get(slot)
        if proc is None or not proc.ready:
            self.pending_admits.setdefault(slot, []).append(item)
            return
        proc.admitting[item[0]] = item
        self._send_actor(proc, messages.Admit([item]).encode())

    def _on_admitted(self, proc: ActorProcess, msg: messages.Admitted) -> None:
        for task_id, verdict, holder in msg.decisions:
            if proc.admitting.pop(task_id, None) is None:
                continue
            entry = self.admissions.pop(task_id, None)
            if entry is None:
                continue
            pending, i, row = entry
            if verdict in ("run", "queue"):
                self._record([row], proc.spec.slot, verdict == "queue")
            else:
                pending.results[i] = [holder, verdict == "join", verdict == "reject"]
            pending.remaining -= 1
            if not pending.remaining:
                self._complete(pending)

    def _on_promote(self, msg: messages.Promote) -> None:
        for task_id in msg.task_ids:
            task = self.live.get(task_id)
            if task is not None and task.blocked:
                task.blocked = False
                self._queue(task, task.run_at)

    def _release(self, task: LiveTask) -> None:
        """Tell the key's owner that ``task`` is over (a restarting owner rebuilds from the store)."""
        proc = self.procs.get(task.owner or "")
        if task.lock_key is not None and proc is not None and proc.ready:
            self._send_actor(proc, messages.Release(task.id, task.lock_key).encode())

    def _key_rows(self) -> dict[str, list[list[Any]]]:
        """slot -> the live keys it owns: ``[key, [holder, *queued]]``, from the store, after the
        cancelled or timed-out attempts whose bodies still run (they hold their keys until then)."""
        keys: dict[str, dict[str, list[str]]] = {}
        for task in self.abandoned_keys.values():
            assert task.lock_key is not None
            keys.setdefault(self._owner(task.name, task.lock_key), {}).setdefault(task.lock_key, []).append(task.id)
        for task_id, name, key in self.store.live_locked():
            if name in self.app.tasks:
                keys.setdefault(self._owner(name, key), {}).setdefault(key, []).append(task_id)
        return {slot: [[k, ids] for k, ids in by_key.items()] for slot, by_key in keys.items()}

    # ---- pools that change: worker nodes join and leave ----------------------------------------
    def _pools_changed(self) -> None:
        """Recompute the pools from the live slots; if they changed, move key ownership.

        A key's owner is a hash over its pool, so a node joining or leaving moves some keys. To
        move them without a window where two owners could both admit one key: new admissions are
        held, the outstanding ones are answered (or die with their actor), and only then every
        owner rebuilds its table from the store (``Rekey``) -- the same rebuild a restarted owner
        does -- and the held admissions go to the new owners."""
        specs = [s for s in self._all_specs() if s.node is None or not self.node_link.leaving(s.node)]
        pools = {role: [s.slot for s in specs if s.role == role] for role in self.ready}
        if pools == self.pools:
            return
        self.pools = pools
        self.rekeying = True
        self._finish_rekey()

    def _finish_rekey(self) -> None:
        if any(proc.admitting for proc in self.procs.values()):
            return  # wait for the answers: they were decided under the old owners
        self.rekeying = False
        held = [item for items in self.pending_admits.values() for item in items] + self.held_admits
        self.held_admits = []
        queued = [task_id for queue in self.slot_ready.values() for task_id in queue]
        slots = {s.slot for s in self._all_specs()}
        self.pending_admits = {slot: [] for slot in slots}
        self.slot_ready = {slot: collections.deque() for slot in slots}
        for task in itertools.chain(self.live.values(), self.abandoned_keys.values()):
            if task.lock_key is not None:
                task.owner = self._owner(task.name, task.lock_key)
        for task_id in queued:
            moved = self.live.get(task_id)
            if moved is not None and moved.owner is not None:
                self.slot_ready[moved.owner].append(task_id)
        rows = self._key_rows()
        for proc in self.procs.values():
            if proc.ready and proc.spec.role != ROLE_CLOCK:
                self._send_actor(proc, messages.Rekey(rows.get(proc.spec.slot, [])).encode())
        for item in held:
            self._admit(item)
        log.info("pools now: %s", {role: len(slots) for role, slots in self.pools.items()})

    def _all_specs(self) -> list[ChildSpec]:
        return self.specs + self.node_link.specs()

    def _on_wait(self, ident: bytes, msg: messages.Wait, payload: Frames) -> None:
        task = self.live.get(msg.task_id)
        if task is not None:
            task.waiters.append((ident, msg.req))
            self.waiter_index[(ident, msg.req)] = task.id
            return
        outcome = self.store.outcome(msg.task_id)
        if outcome is None:
            raise self._unknown(msg.task_id)
        state, result, error = outcome
        if state in ("SCHEDULED", "QUEUED"):  # delayed, or in the backlog: in the store only for now
            self.parked.setdefault(msg.task_id, []).append((ident, msg.req))
            self.waiter_index[(ident, msg.req)] = msg.task_id
            return
        self._reply(ident, msg.req, True, [state, *error], [result or b""])

    def _on_forget(self, ident: bytes, msg: messages.Forget, payload: Frames) -> None:
        task_id = self.waiter_index.pop((ident, msg.req), None)
        task = self.live.get(task_id) if task_id else None
        if task is not None:
            task.waiters = [w for w in task.waiters if w != (ident, msg.req)]
        elif task_id in self.parked:
            self.parked[task_id] = [w for w in self.parked[task_id] if w != (ident, msg.req)]
            if not self.parked[task_id]:
                del self.parked[task_id]
        for waiters in self.event_waiters.values():
            waiters[:] = [w for w in waiters if (w[0], w[1]) != (ident, msg.req)]

    def _on_info(self, ident: bytes, msg: messages.Info, payload: Frames) -> None:
        self._reply(ident, msg.req, True, [self.store.info(tid) for tid in msg.task_ids[:1000]])

    def _on_cancel(self, ident: bytes, msg: messages.Cancel, payload: Frames) -> None:
        task = self.live.get(msg.task_id) or self._load_stored(msg.task_id)
        if task is None:
            if self.store.info(msg.task_id) is None:
                raise self._unknown(msg.task_id)
            self._reply(ident, msg.req, True, False)
            return
        if task.state == "RUNNING" and task.actor is not None:
            self._abandon(task, "cancel")
        self._finish(task, "CANCELLED", b"", ("TaskCancelled", "cancelled by request", ""))
        self._reply(ident, msg.req, True, True)

    def _on_list(self, ident: bytes, msg: messages.ListTasks, payload: Frames) -> None:
        from ..errors import ConfigError

        if msg.state is not None and msg.state not in STATES:
            raise ConfigError(f"unknown state {msg.state!r}; expected one of {', '.join(STATES)}")
        if not 1 <= msg.limit <= 100_000:
            raise ConfigError(f"limit={msg.limit}: expected 1..100000")
        rows = self.store.list_tasks(msg.state, msg.limit)
        for row in rows:
            key, name = row["lock_key"], row["name"]
            row["owner"] = self._owner(name, key) if key is not None and name in self.app.tasks else None
        self._reply(ident, msg.req, True, rows)

    def _on_status(self, ident: bytes, msg: messages.Status, payload: Frames) -> None:
        keys = collections.Counter(t.owner for t in self.live.values() if t.owner and not t.blocked)
        actors = []
        for spec in self._all_specs():
            proc = self.procs.get(spec.slot)
            actors.append(actor_status(proc, spec, self.restarts[spec.slot], self.last_exit[spec.slot],
                                       self.backoff_until[spec.slot], keys[spec.slot],
                                       self._rss(proc) if proc is not None and spec.node else None))
        now = time.monotonic()
        body = {
            "supervisor": {"pid": os.getpid(), "state": "stopping" if self.stopping else "running",
                           "started_at": self.started_at, "state_dir": str(self.state_dir),
                           "rss": psutil.Process().memory_info().rss, "endpoint": self.client_addr,
                           "live_tasks": len(self.live) + self.backlog, "in_memory": len(self.live),
                           "backlog": self.backlog},
            "actors": actors,
            "nodes": self.node_link.status(now),
            "tasks": self._task_counts(),
        }
        self._reply(ident, msg.req, True, body)

    def _task_counts(self) -> dict[str, int]:
        """Tasks per state, without scanning the table: live ones from memory, finished ones
        counted as they finish."""
        counts = collections.Counter(task.state for task in self.live.values() if task.state != "SCHEDULED")
        held = sum(len(proc.running) - proc.busy for proc in self.procs.values())  # sent, not begun
        counts["RUNNING"] -= held
        counts["QUEUED"] += held
        counts["QUEUED"] += self.backlog
        counts.update(self.finished)
        counts["SCHEDULED"] = self.store.count_state("SCHEDULED")  # most of them live in the store only
        return {state: n for state, n in counts.items() if n}

    def _on_events(self, ident: bytes, msg: messages.Events, payload: Frames) -> None:
        if msg.task_id not in self.live and self.store.info(msg.task_id) is None:
            raise self._unknown(msg.task_id)
        self._poll_events(ident, msg.req, ("t", msg.task_id), msg.after)

    def _on_session_events(self, ident: bytes, msg: messages.SessionEvents, payload: Frames) -> None:
        self._poll_events(ident, msg.req, ("s", msg.session_id), msg.after)

    def _on_all_events(self, ident: bytes, msg: messages.AllEvents, payload: Frames) -> None:
        self._poll_events(ident, msg.req, ("a", ""), msg.after)

    def _on_retry(self, ident: bytes, msg: messages.Retry, payload: Frames) -> None:
        from ..errors import ConfigError

        row = self.store.retry_row(msg.task_id)
        if row is None:
            raise self._unknown(msg.task_id)
        name, state, lock_key, sid, sowner, args = row
        if state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise ConfigError(f"task {msg.task_id} is {state}: only a finished task can be retried")
        self.app.get_task(name)
        item = [new_task_id(), name, lock_key, sid, sowner, None]
        self._submit(PendingSubmit(ident, msg.req, 1), [item], [bytes(args or _NO_ARGS)])

    def _on_session_kv(self, ident: bytes, msg: messages.SessionKV, payload: Frames) -> None:
        """session.db for tasks on worker nodes: the same table, written in this turn's
        transaction (so the reply goes out after the commit)."""
        import json

        from ..session import kv_delete, kv_get, kv_items, kv_set

        db, sid, key = self.store.db, msg.session_id, msg.key
        if msg.value is not None:
            if len(msg.value) > self.app.max_payload_bytes:
                raise ConfigError(f"session.db value of {len(msg.value)} bytes is over max_payload_bytes")
            try:
                json.loads(msg.value)
            except ValueError:
                raise ProtocolError("SessionKV value is not JSON") from None
        body: Any
        if msg.op == "get":
            body = kv_get(db, sid, key)
        elif msg.op == "set":
            kv_set(db, sid, key, msg.value or "null")
            body = True
        elif msg.op == "del":
            body = kv_delete(db, sid, key)
        elif msg.op == "items":
            body = [list(row) for row in kv_items(db, sid)]
        else:  # cas
            body = kv_get(db, sid, key) == msg.expected
            if body:
                kv_set(db, sid, key, msg.value or "null")
        self._reply(ident, msg.req, True, body)

    def _poll_events(self, ident: bytes, req: int, key: tuple[str, str], after: int) -> None:
        if not self._send_events(ident, req, key, after):
            self.event_waiters.setdefault(key, []).append((ident, req, after))
            self.waiter_index[(ident, req)] = key[1]

    def _send_events(self, ident: bytes, req: int, key: tuple[str, str], after: int) -> bool:
        """Reply with events after ``after`` if there are any (or the task has ended)."""
        limit = 500
        if key[0] == "t":
            events = self.store.events_after(after, limit, task_id=key[1])
            terminal = key[1] not in self.live and self.store.live_row(key[1]) is None
        elif key[0] == "s":
            events, terminal = self.store.events_after(after, limit, session_id=key[1]), False
        else:
            events, terminal = self.store.events_after(after, limit), False
        if not events and not terminal:
            return False
        self._reply(ident, req, True, {"events": events, "terminal": terminal, "more": len(events) == limit})
        return True

    def _answer_event_waiters(self) -> None:
        tasks, sessions, any_event = self.store.take_touched()
        touched = {("t", t) for t in tasks} | {("s", s) for s in sessions} | ({("a", "")} if any_event else set())
        for key in touched & self.event_waiters.keys():
            for ident, req, after in self.event_waiters.pop(key):
                self.waiter_index.pop((ident, req), None)
                if not self._send_events(ident, req, key, after):
                    self._poll_events(ident, req, key, after)

    def _prune_events(self) -> None:
        """Retention: old events, and finished tasks past the app's result_ttl."""
        removed = self.store.prune_events(time.time() - EVENT_RETENTION, EVENT_MAX_ROWS)
        if self.app.result_ttl is not None:
            pruned = self.store.prune_finished(time.time() - self.app.result_ttl)
            if pruned:  # rare: recount the finished tasks rather than track each pruned state
                self.finished = collections.Counter({k: v for k, v in self.store.counts().items()
                                                     if k in ("SUCCEEDED", "FAILED", "CANCELLED")})
            removed += pruned
        if removed:
            log.info("retention: removed %d old events and finished tasks", removed)
        self._add_timer(max(0.5, min(EVENT_PRUNE_INTERVAL, self.app.result_ttl or EVENT_PRUNE_INTERVAL)),
                        self._prune_events)

    def _on_inject_crash(self, ident: bytes, msg: messages.InjectCrash, payload: Frames) -> None:
        self.app.get_task(msg.name)
        self.crash_plan.setdefault(msg.name, set()).add(msg.attempt)
        self._reply(ident, msg.req, True, True)

    @staticmethod
    def _unknown(task_id: str) -> CapsuleError:
        from ..errors import UnknownTask

        return UnknownTask(f"no task with id {task_id!r} in this runtime")

    _client_handlers: dict[type, Callable[..., None]] = {
        messages.Submit: _on_submit, messages.Wait: _on_wait, messages.Forget: _on_forget,
        messages.Info: _on_info, messages.Cancel: _on_cancel, messages.ListTasks: _on_list,
        messages.Status: _on_status, messages.Events: _on_events, messages.InjectCrash: _on_inject_crash,
        messages.SessionEvents: _on_session_events, messages.AllEvents: _on_all_events,
        messages.Retry: _on_retry, messages.SessionKV: _on_session_kv,
    }

    # ---- actor messages ----------------------------------------------------------------------
    def _on_actor(self, frames: Frames) -> None:
        if len(frames) < 2:
            raise ProtocolError("actor message without a header frame")
        proc = self.by_identity.get(frames[0])
        if proc is None:
            return  # an incarnation we already buried
        msg = messages.decode(frames[1])
        proc.last_seen = time.monotonic()
        if isinstance(msg, messages.Done):
            self._on_done(proc, msg, frames[2] if len(frames) > 2 else b"")
        elif isinstance(msg, messages.Started | messages.Withdrawn) and proc.spec.role == ROLE_PROCESS:
            self._on_held_run(proc, msg)
        elif isinstance(msg, messages.Emit):
            self._on_emit(proc, msg)
        elif isinstance(msg, messages.Admitted):
            self._on_admitted(proc, msg)
        elif isinstance(msg, messages.Promote):
            self._on_promote(msg)
        elif isinstance(msg, messages.Hello):
            self._on_hello(proc)
        elif isinstance(msg, messages.Fire) and proc.spec.role == ROLE_CLOCK:
            self._on_fire(msg)
        elif isinstance(msg, messages.Due) and proc.spec.role == ROLE_CLOCK:
            self._on_due(msg)
        elif not isinstance(msg, messages.Heartbeat):
            raise ProtocolError(f"{type(msg).__name__} is not an actor message")

    def _on_fire(self, msg: messages.Fire) -> None:
        """A schedule's slot came: submit its task as the owner session (joining a run that is
        still going), and record the slot in the same transaction as that outcome."""
        spec = self.app.schedules.get(msg.name)
        last = self.store.last_slot(msg.name)
        if spec is None or (last is not None and msg.slot <= last):
            return  # already handled: a restarted clock never fires a slot twice
        task = self.app.tasks[msg.name]
        owner = self.app.owner
        item = [new_task_id(), task.name, task.lock_key((), {}), owner.id, owner.owner, None]
        self._submit(PendingSubmit(b"", 0, 1, fire=(msg.name, msg.slot)), [item], [_NO_ARGS])

    def _on_due(self, msg: messages.Due) -> None:
        for task_id in msg.task_ids:
            task = self.live.get(task_id) or self._load_stored(task_id)
            if task is not None and task.state == "SCHEDULED":
                self.store.requeue(task.id, task.session_id, None, None)
                task.state = "QUEUED"
                self._due(task.id)

    def _on_emit(self, proc: ActorProcess, msg: messages.Emit) -> None:
        """A running attempt's session event: record it (in order) unless the attempt is over."""
        task = self.live.get(msg.task_id)
        if task is None or proc.running.get(msg.task_id) != msg.attempt:
            return
        if msg.kind == "card":  # session.show_task(h): follow that task's card from now on
            card = self.store.show_card(str(msg.data.get("card")), task.session_id or "")
            if card is None or task.session_id is None:
                return
            self.store.add_event(str(msg.data["card"]), task.session_id, "card", card)
            return
        if msg.kind == "progress" and isinstance(msg.data.get("fraction"), (int, float)):
            self.store.set_progress(task.id, float(msg.data["fraction"]))  # before: cards show it
        try:
            self.store.add_event(task.id, task.session_id, msg.kind, msg.data)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"Emit data is not JSON: {exc}") from None

    def _on_hello(self, proc: ActorProcess) -> None:
        """Welcome the actor with the registry and the live keys of its slot (read from the
        store), then the admission requests that waited for it."""
        proc.ready = True
        slot = proc.spec.slot
        config: dict[str, Any] = {"state_dir": str(self.state_dir), "concurrency": proc.spec.concurrency}
        if proc.spec.role == ROLE_CLOCK:
            config.update(schedules=self.store.schedule_marks(), db=str(self.state_dir / DB_FILE))
            self.wake_clock = False
        else:
            config["keys"] = self._key_rows().get(slot, [])
        if proc.spec.node is not None:
            config.update(state_dir="", node=proc.spec.node)
        self._send_actor(proc, messages.Welcome(config).encode())
        waiting, self.pending_admits[slot] = self.pending_admits.get(slot, []), []
        for item in waiting:
            self._admit(item)
        if all(p.ready for p in self.procs.values()) and len(self.procs) == len(self.specs):
            self._announce_ready()

    def _on_done(self, proc: ActorProcess, msg: messages.Done, frame: bytes) -> None:
        self._attempt_done(proc, msg, frame)
        if msg.began_next:
            self._begun(proc, msg.began_next, None)

    def _attempt_done(self, proc: ActorProcess, msg: messages.Done, frame: bytes) -> None:
        proc.tasks_done += 1
        if msg.task_id in proc.abandoned:  # its key was kept until the body really stopped
            proc.abandoned.discard(msg.task_id)
            task_key = self.abandoned_keys.pop(msg.task_id, None)
            if task_key is not None:
                self._release(task_key)
            return
        if proc.running.get(msg.task_id) != msg.attempt:
            return
        del proc.running[msg.task_id]
        proc.begun.discard(msg.task_id)
        proc.withdrawing.discard(msg.task_id)
        self._maybe_recycle(proc)
        task = self.live.get(msg.task_id)
        if task is None or task.attempts != msg.attempt or task.state != "RUNNING":
            return
        error = (msg.error_type, msg.error_message, msg.traceback) if msg.outcome != "ok" else None
        self._end_attempt(task, msg.outcome, error, frame, msg.retryable)

    def _begun(self, proc: ActorProcess, task_id: str, attempt: int | None) -> None:
        """A process actor began a held Run (its Started, or the Done before it): record the
        attempt's start, and start its timeout now."""
        if task_id not in proc.running or attempt not in (None, proc.running[task_id]):
            if task_id in proc.abandoned:  # cancelled while this news was on its way: stop the body
                self._stop_process(proc)
            return
        task = self.live.get(task_id)
        if task_id in proc.begun or task is None or task.state != "RUNNING":
            return
        self._mark_started(proc, task_id)
        timeout = self.app.tasks[task.name].timeout
        if timeout:
            self._add_timer(timeout, self._process_timeout, task.id, task.attempts)

    def _rebalance(self) -> int:
        """Nothing queued but a process actor idle: ask back a Run another one holds behind a
        running task, so a long task never keeps a short one waiting while a slot is free."""
        idle = sum(1 for p in self.procs.values() if p.spec.role == ROLE_PROCESS and p.load == 0 and p.has_room())
        asked = 0
        for proc in self.procs.values():
            if asked == idle:
                break
            if proc.spec.role != ROLE_PROCESS or len(proc.running) < 2:
                continue
            for task_id, attempt in proc.running.items():
                task = self.live.get(task_id)
                if (not proc.began(task_id) and task_id not in proc.withdrawing and task is not None
                        and task.owner is None):  # a locked task belongs to its key's owner
                    proc.withdrawing.add(task_id)
                    self._send_actor(proc, messages.Withdraw(task_id, attempt).encode())
                    asked += 1
                    break
        return asked

    def _on_held_run(self, proc: ActorProcess, msg: messages.Started | messages.Withdrawn) -> None:
        """A process actor began a held Run (Started), or gave it back (Withdrawn)."""
        if isinstance(msg, messages.Started):
            self._begun(proc, msg.task_id, msg.attempt)
            return
        proc.withdrawing.discard(msg.task_id)
        if msg.task_id in proc.abandoned:  # cancelled meanwhile: this is the answer it waited for
            proc.abandoned.discard(msg.task_id)
            return
        task = self.live.get(msg.task_id)
        if proc.running.get(msg.task_id) != msg.attempt or proc.began(msg.task_id) or task is None:
            return
        del proc.running[msg.task_id]
        self._give_back(task)

    def _mark_started(self, proc: ActorProcess, task_id: str) -> None:
        task = self.live[task_id]
        proc.begun.add(task_id)
        proc.withdrawing.discard(task_id)
        self.store.mark_running(task.id, task.session_id, task.attempts, proc.spec.slot, time.time())

    # ---- dispatch and outcomes ---------------------------------------------------------------
    def _dispatch(self) -> int:
        """Start queued attempts on actors with room; return how many messages that sent."""
        if self.stopping:
            return 0
        started = self.started_attempts
        self._page_in()
        for slot, queue in self.slot_ready.items():
            proc = self.procs.get(slot)
            while queue and proc is not None and proc.has_room():
                task = self.live.get(queue.popleft())
                if task is not None and task.state == "QUEUED" and not task.blocked:
                    self._start_attempt(task, proc)
        for role, queue in self.ready.items():
            while queue:
                task = self.live.get(queue[0])
                if task is None or task.state != "QUEUED":
                    queue.popleft()
                    continue
                proc = self._pick(role)
                if proc is None:
                    break
                queue.popleft()
                self._start_attempt(task, proc)
        withdrawn = 0 if self.ready[ROLE_PROCESS] else self._rebalance()
        return self.started_attempts - started + withdrawn

    def _pick(self, role: str) -> ActorProcess | None:
        best = None
        for proc in self.procs.values():
            if proc.spec.role == role and proc.has_room() and (best is None or proc.load < best.load):
                best = proc
        return best

    def _start_attempt(self, task: LiveTask, proc: ActorProcess) -> None:
        spec = self.app.tasks[task.name]
        self.started_attempts += 1
        task.attempts += 1
        task.state = "RUNNING"
        task.actor = proc
        held = proc.spec.role == ROLE_PROCESS and proc.load > 0  # it runs this after the one it has
        proc.running[task.id] = task.attempts
        # Arguments live in the store only (RAM stays flat): the update that starts the attempt
        # reads them. A held Run's attempt is recorded when it begins (``_begun``).
        if held:
            payload = self.store.args(task.id)
        else:
            payload = self.store.mark_running(task.id, task.session_id, task.attempts, proc.spec.slot, time.time())
            if proc.spec.role == ROLE_PROCESS:
                proc.begun.add(task.id)
        crash = task.attempts in self.crash_plan.get(task.name, ())
        actor_timeout = spec.timeout if proc.spec.role == ROLE_WORKER else None
        run = messages.Run(task.id, task.attempts, task.name, task.session_id, task.session_owner,
                           actor_timeout, crash, held)
        self._send_actor(proc, run.encode(), payload)
        if spec.timeout and proc.spec.role == ROLE_PROCESS and not held:
            self._add_timer(spec.timeout, self._process_timeout, task.id, task.attempts)

    def _process_timeout(self, task_id: str, attempt: int) -> None:
        task = self.live.get(task_id)
        if task is None or task.attempts != attempt or task.state != "RUNNING":
            return
        timeout = self.app.tasks[task.name].timeout
        self._abandon(task, "timeout")
        self._end_attempt(task, "timeout", ("TaskTimeout", f"attempt {attempt} ran past timeout={timeout} s", ""),
                          b"", True)

    def _abandon(self, task: LiveTask, why: str) -> None:
        """Stop caring about a running attempt; a process actor is killed and replaced."""
        proc = task.actor
        assert proc is not None
        attempt = proc.running.pop(task.id, None)
        if attempt is None:
            return
        proc.abandoned.add(task.id)
        if task.lock_key is not None and proc.spec.role == ROLE_WORKER:
            self.abandoned_keys[task.id] = task
        if proc.spec.role == ROLE_PROCESS and task.id in proc.begun:
            self._stop_process(proc)
        else:  # a process actor drops a Run it has not begun (or its Started comes and we kill it)
            self._send_actor(proc, messages.CancelRun(task.id, attempt).encode())

    def _stop_process(self, proc: ActorProcess) -> None:
        """Kill a process actor to stop the body it runs; the Run it holds is given back."""
        proc.stopping = True
        self._kill(proc, signal.SIGTERM)
        self._add_timer(KILL_GRACE, self._kill_if_alive, proc)

    def _kill_if_alive(self, proc: ActorProcess) -> None:
        if self.procs.get(proc.spec.slot) is proc:
            self._kill(proc)

    def _end_attempt(self, task: LiveTask, outcome: str, error: tuple[str, str, str] | None,
                     frame: bytes, retryable: bool) -> None:
        task.actor = None
        if outcome == "ok":
            self._finish(task, "SUCCEEDED", frame, None)
            return
        if outcome == "cancelled":
            self._finish(task, "CANCELLED", b"", error)
            return
        spec = self.app.tasks[task.name]
        if retryable and task.attempts < 1 + spec.retries:
            delay = spec.backoff.delay(task.attempts)
            task.state = "QUEUED"
            self.store.requeue(task.id, task.session_id, time.time() + delay if delay else None, error)
            self._queue(task, time.time() + delay if delay else None)
            return
        self._finish(task, "FAILED", frame, error)

    def _finish(self, task: LiveTask, state: str, result: bytes, error: tuple[str, str, str] | None) -> None:
        self.store.finish(task.id, task.session_id, state, result or None, error, time.time())
        self.finished[state] += 1
        self.live.pop(task.id, None)
        task.state = state
        if task.lock_key is not None and task.id not in self.abandoned_keys:
            self._release(task)  # else: when its abandoned attempt reports, or its actor is replaced
        body = [state, *(error or (None, None, None))]
        for ident, req in task.waiters:
            self.waiter_index.pop((ident, req), None)
            self._reply(ident, req, True, body, [result or b""])
        task.waiters.clear()
