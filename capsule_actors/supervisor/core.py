"""The supervisor loop: one thread, one transaction per turn, replies only after the commit.

Each turn: poll the client socket, the actor socket and the signal fd; handle every message that
is waiting (submits, waits, results, heartbeats, child exits); run due timers; dispatch queued
tasks to actors with room; COMMIT; then send the acks, dispatches and results of that turn.

The ``Supervisor`` holds the state (the store, the sockets, the live tasks and queues, the actor
processes) and the loop; the behaviour is in one part per role, each with a ``sup`` reference:
``Intake`` (intake.py: submits, journals, firings, the backlog), ``KeyRouting`` (keys.py: lock
admissions, re-keying), ``Attempts`` (attempts.py: dispatch and outcomes), ``ClientRequests``
(requests.py: every other client request), ``Children`` (children.py: actor processes) and
``NodeLink`` (nodes.py: worker nodes).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import heapq
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from .. import messages
from ..app import App
from ..errors import (
    AlreadyRunning,
    CapsuleError,
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
    private_umask,
    read_runtime_file,
    remove_runtime_file,
    write_runtime_file,
)
from .attempts import Attempts
from .children import (
    HEARTBEAT_CHECK,
    MEMORY_CHECK,
    ROLE_CLOCK,
    ROLE_PROCESS,
    ROLE_WORKER,
    WORKER_CONCURRENCY,
    ActorProcess,
    Children,
    ChildSpec,
)
from .intake import Intake
from .keys import KeyRouting
from .live import LiveTask
from .nodes import NODE_CHECK, NODE_LOSS, NodeLink
from .requests import ClientRequests
from .router import owner

log = logging.getLogger("capsule_actors.supervisor")

DRAIN_LIMIT = 2000  # messages per socket per turn, so one flood cannot starve the rest
LAZY_COMMIT = 0.002  # seconds a dispatch's RUNNING rows may wait for the next turn's commit

Frames = list[bytes]
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_REMOTE = b"\x01tcp:"  # prefix of remote client identities (local ROUTER identities start with 0)


class Supervisor:
    """Owns the state directory, the store, the sockets and every actor process."""

    def __init__(
        self,
        app: App,
        registry: bytes,
        state_dir: Path,
        *,
        workers: int | None = None,
        process_workers: int | None = None,
        grace: float | None = None,
        ready_fd: int | None = None,
        bind_tcp: str | None = None,
        keys_dir: Path | None = None,
    ) -> None:
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
        self.specs += [
            ChildSpec(f"p{i}", ROLE_PROCESS, 1, self.grace, max_tasks=app.max_tasks_per_process or 0)
            for i in range(n_process)
        ]
        self.specs.append(ChildSpec("c0", ROLE_CLOCK, 1, self.grace))
        self.wake_clock = False
        self.procs: dict[str, ActorProcess] = {}  # slot -> live incarnation
        self.live: dict[str, LiveTask] = {}
        self.ready = {ROLE_WORKER: collections.deque[str](), ROLE_PROCESS: collections.deque[str]()}
        self.pools = {role: [s.slot for s in self.specs if s.role == role] for role in self.ready}
        self.slot_ready = {s.slot: collections.deque[str]() for s in self.specs}  # locked tasks
        self.abandoned_keys: dict[str, LiveTask] = {}  # cancelled/timed-out locked tasks still unwinding
        self.timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.timer_seq = itertools.count()
        self.outbox: list[tuple[zmq.Socket, Frames]] = []  # type: ignore[type-arg]
        self.after_commit: list[tuple[zmq.Socket, Frames]] = []  # type: ignore[type-arg]  # journaled acks
        self.stopping = False
        self.lazy_commit_at: float | None = None
        self.node_link = NodeLink(self)  # worker nodes on other machines
        # behaviour by role, each part in its own module with the state only it keeps; the state
        # above is read and written by several parts
        self.intake = Intake(self)  # submits, journals, firings, the backlog
        self.keys = KeyRouting(self)  # lock-key admissions and re-keying
        self.attempts = Attempts(self)  # dispatch and outcomes
        self.requests = ClientRequests(self)  # every other client request
        self.children = Children(self)  # the actor processes: spawns, exits, restarts, recycling
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
                raise StateDirError(
                    f"cannot set up the state directory {str(self.state_dir)!r}: {exc.strerror or exc}"
                ) from None
        except CapsuleError as exc:
            self._announce(f"error {type(exc).__name__}: {exc}")
            raise
        try:
            self.store.begin()
            self.store.register_schedules(((s.name, s.cron, s.tz) for s in self.app.schedules.values()), time.time())
            self._recover()
            self.intake.replay_journals()
            self.store.commit()
            self.attempts.finished = collections.Counter(
                {k: v for k, v in self.store.counts().items() if k in ("SUCCEEDED", "FAILED", "CANCELLED")}
            )
            self.children.start_template()
            for spec in self.specs:
                self.children.start_actor(spec)
            self.add_timer(HEARTBEAT_CHECK, self.children.check_heartbeats)
            self.add_timer(NODE_CHECK, self.node_link.check)
            self.add_timer(1.0, self.requests.prune_events)
            if self.app.max_process_memory_mb:
                self.add_timer(MEMORY_CHECK, self.children.check_memory)
            self.add_timer(30.0, self._announce_ready)  # ready even if an actor never says hello
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
            actor_ep = dataclasses.replace(
                actor_ep, server_public=client_ep.server_public, server_secret=client_ep.server_secret
            )
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
        write_runtime_file(
            self.state_dir,
            RuntimeFile(
                pid=os.getpid(),
                client=self.client_addr,
                actor=self.actor_addr,
                server_public=self.server_public,
                started_at=self.started_at,
                state_dir=str(self.state_dir),
            ),
        )
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
            self.children.kill_actor(proc)
        self.node_link.stop()
        if self.children.template is not None:
            self.children.template.close()
        if hasattr(self, "store"):
            try:
                self.commit()
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
                    Path(addr[len("ipc://") :]).unlink(missing_ok=True)
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
        if self.outbox or self.wake_clock or self.requests.event_waiters or self.stopping or lazy_due:
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
        if self.attempts.dispatch():
            if held_back:
                self.commit()
            self._flush()
            if self.lazy_commit_at is None and self.store.dirty():  # they ride the next commit
                self.lazy_commit_at = time.monotonic() + LAZY_COMMIT
        elif self.lazy_commit_at is None:
            self.commit()
            self._flush()
            self.store.checkpoint_if_needed()

    def _handle(self, ready: dict[Any, int]) -> None:
        """Everything that is waiting: signals, child exits, messages, due timers."""
        if self.sig_r.fileno() in ready:
            self.children.on_signals()
        template = self.children.template
        if template is not None and (template.fd in ready or template.pending()):
            self.children.on_template_events()
        if self.actor_sock in ready:
            self._drain(self.actor_sock, self._on_actor)
        if self.client_sock in ready:
            self._drain(self.client_sock, self.requests.on_message)
        if self.remote_sock is not None and self.remote_sock in ready:
            self._drain(self.remote_sock, self._on_remote)
        self._run_timers()
        if self.keys.rekeying:
            self.keys.finish_rekey()

    def commit(self) -> None:
        """Commit; the acks that were waiting for any commit can go with the next flush."""
        self.lazy_commit_at = None
        self.store.commit()
        self.outbox += self.after_commit
        self.after_commit.clear()

    def _commit_and_send(self) -> None:
        self.commit()
        self.requests.answer_event_waiters()
        if self.wake_clock:
            self._wake_clock()
        self._flush()
        self.store.checkpoint_if_needed()

    def _wake_clock(self) -> None:
        clock = self.procs.get("c0")
        if clock is not None and clock.ready:
            self.wake_clock = False
            self.send_actor(clock, messages.Wake("scheduled").encode())

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

    def add_timer(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), fn, args))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self.timers)
            fn(*args)

    def reply(
        self,
        ident: bytes,
        req: int,
        ok: bool,
        body: Any,
        frames: Frames = (),  # type: ignore[assignment]
        outbox: list[tuple[zmq.Socket, Frames]] | None = None,  # type: ignore[type-arg]
    ) -> None:
        """Queue a reply: in ``outbox`` (sent at this turn's commit), or in ``after_commit``
        (sent at whichever commit comes next, without forcing one)."""
        sock = self.client_sock
        if ident.startswith(_REMOTE) and self.remote_sock is not None:
            sock, ident = self.remote_sock, ident[len(_REMOTE) :]
        (self.outbox if outbox is None else outbox).append(
            (sock, [ident, messages.Reply(req, ok, body).encode(), *frames])
        )

    def _on_remote(self, frames: Frames) -> None:
        """The TCP socket carries remote clients, worker nodes and the nodes' actors."""
        proc = self.children.by_identity.get(frames[0])
        if proc is not None and proc.spec.node is not None:
            self._on_actor(frames)
        elif frames[0].startswith(NODE_PREFIX):
            self.node_link.on_message(frames)
        else:  # a client: the same handlers, its identity marked for the reply
            self.requests.on_message([_REMOTE + frames[0], *frames[1:]])

    def send_actor(self, proc: ActorProcess, *frames: bytes) -> None:
        sock = self.actor_sock if proc.spec.node is None else self.remote_sock
        assert sock is not None
        self.outbox.append((sock, [proc.identity, *frames]))

    def error_reply(self, ident: bytes, req: int, exc: CapsuleError) -> None:
        self.reply(ident, req, False, [type(exc).__name__, str(exc)])

    # ---- recovery ----------------------------------------------------------------------------
    def _recover(self) -> None:
        now = time.time()
        held: set[str] = set()
        for row in self.store.live_tasks():
            task = LiveTask(
                row["id"],
                row["name"],
                row["state"],
                row["attempts"],
                row["lock_key"],
                row["session_id"],
                row["session_owner"],
                run_at=row["run_at"],
            )
            spec = self.app.tasks.get(task.name)
            if spec is not None and task.state == "SCHEDULED" and task.lock_key is None:
                self.wake_clock = True  # stays in the store; the clock hands it over when due
                continue
            if spec is None:
                self.store.finish(
                    task.id,
                    task.session_id,
                    "FAILED",
                    None,
                    ("UnknownTask", f"the app has no task {task.name!r} any more", ""),
                    now,
                )
                continue
            if (
                task.state == "QUEUED"
                and task.lock_key is None
                and (task.run_at or 0) <= now
                and self.intake.to_backlog(row["rowid"])
            ):
                continue
            self.live[task.id] = task
            if task.lock_key is not None:
                task.owner = self.owner_of(task.name, task.lock_key)
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
                    self.attempts.finish(
                        task,
                        "FAILED",
                        b"",
                        ("WorkerCrashed", "the supervisor died while the task was running and no retry remained", ""),
                    )
                    continue
            if not task.blocked:
                self.queue(task, task.run_at)
        if self.live:
            log.info("recovered %d live tasks from the store", len(self.live))

    def queue(self, task: LiveTask, run_at: float | None) -> None:
        if task.state == "SCHEDULED":  # the clock actor hands it over when it is due
            self.wake_clock = True
            return
        delay = (run_at - time.time()) if run_at else 0.0
        if delay > 0:
            self.add_timer(delay, self.due, task.id)
        else:
            self.due(task.id)

    def due(self, task_id: str) -> None:
        task = self.live.get(task_id)
        if task is not None and task.state in ("QUEUED", "SCHEDULED") and not task.blocked:
            task.state = "QUEUED"
            queue = self.slot_ready[task.owner] if task.owner else self.ready[self.role_of(task)]
            queue.append(task_id)

    def owner_of(self, name: str, key: str) -> str:
        return owner(key, self.pools[ROLE_PROCESS if self.app.tasks[name].process else ROLE_WORKER])

    def role_of(self, task: LiveTask) -> str:
        return ROLE_PROCESS if self.app.tasks[task.name].process else ROLE_WORKER

    def all_specs(self) -> list[ChildSpec]:
        return self.specs + self.node_link.specs()

    # ---- actor messages ----------------------------------------------------------------------
    def _on_actor(self, frames: Frames) -> None:
        if len(frames) < 2:
            raise ProtocolError("actor message without a header frame")
        proc = self.children.by_identity.get(frames[0])
        if proc is None:
            return  # an incarnation we already buried
        msg = messages.decode(frames[1])
        proc.last_seen = time.monotonic()
        if isinstance(msg, messages.Done):
            self.attempts.on_done(proc, msg, frames[2] if len(frames) > 2 else b"")
        elif isinstance(msg, messages.Started | messages.Withdrawn) and proc.spec.role == ROLE_PROCESS:
            self.attempts.on_held_run(proc, msg)
        elif isinstance(msg, messages.Emit):
            self._on_emit(proc, msg)
        elif isinstance(msg, messages.Admitted):
            self.keys.on_admitted(proc, msg)
        elif isinstance(msg, messages.Promote):
            self.keys.on_promote(msg)
        elif isinstance(msg, messages.Hello):
            self.children.on_hello(proc)
        elif isinstance(msg, messages.Fire) and proc.spec.role == ROLE_CLOCK:
            self.intake.on_fire(msg)
        elif isinstance(msg, messages.Due) and proc.spec.role == ROLE_CLOCK:
            self.intake.on_due(msg)
        elif not isinstance(msg, messages.Heartbeat):
            raise ProtocolError(f"{type(msg).__name__} is not an actor message")

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
