"""The supervisor loop: one thread, one transaction per turn, replies only after the commit.

Each turn: poll the client socket, the actor socket and the signal fd; handle every message that
is waiting (submits, waits, results, heartbeats, child exits); run due timers; COMMIT; send the
turn's acks and results; then dispatch queued tasks to actors with room.

``Supervisor`` owns the process-level things (the pid lock, the sockets, the loop) and builds the
parts, each with the collaborators it uses (see ``_build``); it keeps the tables from message
type to handler and the few reactions that involve several parts (an actor's hello and death).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from .. import messages, store
from ..app import App
from ..errors import (
    AlreadyRunning,
    CapsuleError,
    ConfigError,
    Fenced,
    KeyRefused,
    ProtocolError,
    StateDirError,
    StoreFull,
    StoreUnavailable,
)
from ..metrics import MetricsServer, parse_address
from ..transport import (
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
from .children import HEARTBEAT_CHECK, MEMORY_CHECK, Children
from .cluster import LEASE, Membership
from .flows import FlowSteps
from .intake import Intake
from .keygate import KeyGate, key_name
from .keys import KeyRouting
from .limits import Limits
from .node_table import NodeTable
from .nodes import NODE_CHECK, NodeLink
from .outbox import REMOTE, Frames, Outbox, Socket
from .requests import ClientRequests
from .retention import Retention
from .sessions import Sessions
from .specs import ROLE_CLOCK, ROLE_PROCESS, ROLE_WORKER, WORKER_CONCURRENCY, ActorProcess, ChildSpec
from .status import StatusReport
from .tally import MetricsView, TaskTally
from .tasks import TaskTable
from .timers import Timers
from .waiters import Waiters

log = logging.getLogger("capsule_actors.supervisor")

DRAIN_LIMIT = 2000  # messages per socket per turn, so one flood cannot starve the rest
LAZY_COMMIT = 0.002  # seconds a dispatch's RUNNING rows may wait for the next turn's commit
READY_AFTER = 30.0  # announce "ready" by then even if an actor never says hello
METRICS_EVERY = 1.0  # seconds between the copies of the counters that /metrics serves
STORE_RETRY = 1.0  # seconds between commits tried while the store has no room (StoreFull)

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def child_specs(app: App, workers: int | None, process_workers: int | None, grace: float) -> list[ChildSpec]:
    """This host's slots in start order: the worker pool, the process pool, then the clock (it
    fires into the pools). All permanent."""
    cpus = os.cpu_count() or 1
    n_workers = workers or app.workers or cpus
    n_process = process_workers or app.process_workers or cpus
    specs = [ChildSpec(f"w{i}", ROLE_WORKER, WORKER_CONCURRENCY, grace) for i in range(n_workers)]
    specs += [
        ChildSpec(f"p{i}", ROLE_PROCESS, 1, grace, max_tasks=app.max_tasks_per_process or 0) for i in range(n_process)
    ]
    specs.append(ChildSpec("c0", ROLE_CLOCK, 1, grace))
    return specs


def _lock_soon(fd: int, wait: float = 0.1) -> None:
    """The pid lock, exclusive; a reader checking liveness holds it shared for microseconds
    (transport.supervisor_lock_held), so try a few times before calling it taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


class Supervisor:
    """Owns the state directory's lock, the sockets and the loop; the parts own the rest."""

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
        store_url: str | None = None,
        metrics: str | None = None,
        cluster_name: str | None = None,
        lease: float = LEASE,
    ) -> None:
        self.app = app
        self.registry = registry
        self.state_dir = state_dir
        self.grace = app.grace if grace is None else grace
        self.specs = child_specs(app, workers, process_workers, self.grace)
        self.ready_fd = ready_fd
        self.bind_tcp = bind_tcp
        self.keys_dir = keys_dir
        self.store_url = store_url  # None: SQLite in the state directory; resolved by the caller (bootstrap.py)
        if cluster_name is not None and not store.is_postgres(store_url):
            raise ConfigError(
                f"--name {cluster_name!r}: a cluster member needs a PostgreSQL store that every member shares "
                "(--store postgresql://…, or CAPSULE_STORE); SQLite serves one supervisor only"
            )
        if not lease > 0:
            raise ConfigError(f"--lease {lease!r}: expected seconds above 0")
        self.cluster_name = cluster_name
        self.lease = lease
        self.membership: Membership | None = None
        self.fenced = False
        self.remote_sock: Socket | None = None
        self.keygate: KeyGate | None = None  # the TCP socket's authorized keys (--bind)
        self.started_at = time.time()
        self.announced_ready = False
        self.lazy_commit_at: float | None = None
        self.store_held = False  # a commit found no room: its writes and what followed them wait
        self.dropped = 0
        self.timers = Timers()
        self.metrics_address = metrics or app.metrics  # HOST:PORT of /metrics, None: not served
        self.tally = TaskTally(enabled=bool(self.metrics_address))
        self.metrics_server: MetricsServer | None = None
        self.metrics_view: MetricsView | None = None  # the loop's last published copy (read by the server)

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
            self._build()
            self.store.begin()
            if self.membership is not None:
                self.membership.join()
            schedules = ((s.name, s.cron, s.tz) for s in self.app.schedules.values())
            self.store.register_schedules(schedules, time.time())
            self.intake.recover()
            self.flows.recover()
            with contextlib.suppress(StoreFull):  # no room to record them: the journals stay
                self.intake.replay_journals()
            self.commit()
            self.attempts.count_finished()
            self.children.start()
            self.timers.add(HEARTBEAT_CHECK, self.children.check_heartbeats)
            self.timers.add(NODE_CHECK, self.node_link.check)
            self.timers.add(1.0, self.retention.prune)
            self.timers.add(STORE_RETRY, self._retry_store)
            if self.app.max_process_memory_mb:
                self.timers.add(MEMORY_CHECK, self.children.check_memory)
            self.timers.add(READY_AFTER, self._announce_ready)
            if self.metrics_server is not None:
                self._publish_metrics()
            while not (self.children.stopping and not self.children.procs):
                self._turn()
            if self.membership is not None:
                self.membership.leave()
        except Fenced as exc:
            log.error("%s", exc)
            self.fenced = True
            if hasattr(self, "children"):
                self.children.kill_all()
            raise
        except StoreUnavailable as exc:
            log.error("%s", exc)
            raise
        finally:
            self._teardown()
        log.info("supervisor stopped")
        return 0

    def _setup(self) -> None:
        ensure_state_dir(self.state_dir)
        self._lock_fd = self._take_lock()
        with private_umask():
            self.store = store.open_store(self.state_dir, self.store_url, self.app.name)
            store.remember(self.state_dir, self.store_url, self.app.name)  # for boards and commands
        self.store.check()  # a damaged store is refused before anything is served from it
        self.store.maintain()
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
        runtime = RuntimeFile(
            pid=os.getpid(),
            client=self.client_addr,
            actor=self.actor_addr,
            server_public=self.server_public,
            started_at=self.started_at,
            state_dir=str(self.state_dir),
        )
        write_runtime_file(self.state_dir, runtime)
        if self.metrics_address:
            self._serve_metrics(self.metrics_address)
        log.info("supervisor pid %d serving %s on %s", os.getpid(), self.state_dir, self.client_addr)

    def _build(self) -> None:
        """The parts, each given what it uses; read top to bottom, every constructor's arguments
        are built above it."""
        app, db, timers = self.app, self.store, self.timers
        self.outbox = outbox = Outbox(self.client_sock, self.actor_sock, self.remote_sock)
        self.nodes = nodes = NodeTable(outbox)
        self.children = children = Children(
            app,
            self.registry,
            self.specs,
            actor_endpoint=self.actor_addr,
            server_public=self.server_public,
            state_dir=self.state_dir,
            grace=self.grace,
            nodes=nodes,
            outbox=outbox,
            timers=timers,
            poller=self.poller,
            on_exit=self._on_actor_exit,
        )
        self.tasks = tasks = TaskTable(app, children.slots(), timers)
        self.waiters = waiters = Waiters(db, tasks, outbox)
        self.keys = keys = KeyRouting(app, tasks, children, db, outbox)
        self.limits = limits = Limits(app, tasks, timers)
        self.flows = flows = FlowSteps(db, tasks, keys, app.max_payload_bytes)
        if self.cluster_name is not None:
            from ..store.postgres import PostgresStore

            assert isinstance(db, PostgresStore)
            self.membership = Membership(
                self.cluster_name,
                self.lease,
                str(self.state_dir),
                db,
                tasks,
                keys,
                waiters,
                children,
                timers,
                self.poller,
                self.commit,
            )
        self.intake = intake = Intake(
            app,
            db,
            tasks,
            keys,
            flows,
            waiters,
            outbox,
            timers,
            self.state_dir,
            self._commit_durably,
            self.tally,
            self.membership,
        )
        if self.membership is not None:
            self.membership.bind(intake, flows)
        self.attempts = attempts = Attempts(
            app, db, tasks, children, keys, limits, flows, waiters, outbox, timers, intake.dead_letter, self.tally
        )
        ask = self.membership.ask_step if self.membership is not None else None
        flows.bind(intake.make_due, intake.load_stored, attempts.finish, attempts.abandon, intake.hold_step, ask)
        if self.membership is not None:
            self.membership.bind_attempts(attempts, outbox)
        self.sessions = sessions = Sessions(app, db, tasks, outbox)
        self.retention = retention = Retention(app, db, timers, self.membership)
        self.node_link = NodeLink(app, self.grace, nodes, children, keys, tasks, timers, self.membership)
        status = StatusReport(
            state_dir=self.state_dir,
            endpoint=self.client_addr,
            started_at=self.started_at,
            store=db,
            tasks=tasks,
            intake=intake,
            attempts=attempts,
            retention=retention,
            children=children,
            nodes=nodes,
            tally=self.tally,
            membership=self.membership,
        )
        self.status = status
        self.requests = ClientRequests(
            app, db, tasks, intake, attempts, keys, limits, waiters, sessions, status, outbox, self.membership
        )
        # actor messages: the handler of each type, and the role it must come from (None: any)
        self.actor_handlers: dict[type, tuple[Callable[[ActorProcess, Any, Frames], None], str | None]] = {
            messages.Done: (attempts.on_done, None),
            messages.Started: (attempts.on_held_run, ROLE_PROCESS),
            messages.Withdrawn: (attempts.on_held_run, ROLE_PROCESS),
            messages.Emit: (sessions.on_emit, None),
            messages.Admitted: (self._on_admitted, None),
            messages.Promote: (self._on_promote, None),
            messages.Hello: (self._on_hello, None),
            messages.Fire: (self._on_fire, ROLE_CLOCK),
            messages.Due: (self._on_due, ROLE_CLOCK),
            messages.Heartbeat: (self._on_heartbeat, None),
        }

    def _bind_remote(self) -> None:
        """``--bind tcp://H:P``: a second client socket, CURVE-encrypted, that only admits the
        client keys in KEYS/authorized/ (``KeyGate``, reloaded on SIGHUP)."""
        from ..transport import AUTHORIZED_DIR, SERVER_KEY, load_keys

        if not self.bind_tcp or not self.bind_tcp.startswith("tcp://"):
            raise ConfigError(f"--bind {self.bind_tcp!r}: expected tcp://HOST:PORT")
        keys = self.keys_dir or self.state_dir / "keys"
        public, secret = load_keys(keys, SERVER_KEY)
        authorized = keys / AUTHORIZED_DIR
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise StateDirError(f"no authorized client keys in {str(authorized)!r}: run `capsule-actors keys DIR`")
        self.keygate = KeyGate(self.ctx, authorized)
        self.keygate.start()
        sock = self._router()
        sock.curve_server = True
        sock.curve_secretkey = secret.encode()
        sock.curve_publickey = public.encode()
        sock.bind(self.bind_tcp)
        self.keygate.watch(sock, self.bind_tcp)
        self.remote_sock = sock
        log.info("remote clients: %s (CURVE, keys authorized in %s)", self.bind_tcp, authorized)

    def _serve_metrics(self, address: str) -> None:
        """``/metrics`` on a thread of prometheus_client's, from ``metrics_view``."""
        host, port = parse_address(address)
        self.metrics_server = MetricsServer(host, port, lambda: self.metrics_view)
        port = self.metrics_server.start()
        log.info("metrics on http://%s:%d/metrics", host, port)

    def _publish_metrics(self) -> None:
        """Once a second: a fresh copy of the counters for the scrape thread (one reference swap)."""
        self.metrics_view = self.status.metrics_view()
        self.timers.add(METRICS_EVERY, self._publish_metrics)

    def _take_lock(self) -> int:
        path = self.state_dir / LOCK_FILE
        try:
            with private_umask():
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot create pid lock {str(path)!r}: {exc.strerror}") from None
        try:
            _lock_soon(fd)
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

    def _router(self) -> Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.maxmsgsize = self.app.max_payload_bytes + (1 << 16)  # oversized frames are dropped
        return sock

    def _teardown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if hasattr(self, "children"):
            self.children.close()
            self.node_link.stop()
        if self.membership is not None:
            self.membership.close()
        if hasattr(self, "store"):
            self._close_store()
        if hasattr(self, "ctx"):
            if hasattr(self, "outbox"):
                self.outbox.flush()
            self.client_sock.close(linger=200)
            if self.remote_sock is not None:
                self.remote_sock.close(linger=200)
            if self.keygate is not None:
                self.keygate.stop()
            self.actor_sock.close(0)
            self.ctx.term()
            for addr in (self.client_addr, self.actor_addr):
                if addr.startswith("ipc://"):
                    Path(addr[len("ipc://") :]).unlink(missing_ok=True)
            signal.set_wakeup_fd(-1)
            remove_runtime_file(self.state_dir, os.getpid())
        if hasattr(self, "_lock_fd"):
            os.close(self._lock_fd)

    def _close_store(self) -> None:
        """The last commit (none for a fenced cluster member: nothing more of its may be written)."""
        try:
            if not self.fenced and hasattr(self, "outbox") and not self._commit_at_stop():
                log.error(
                    "stopped with writes the task store had no room for: the submits among them were "
                    "not acknowledged, and the tasks that finished meanwhile run again at the next start"
                )
        finally:
            self.store.close()

    def _commit_at_stop(self) -> bool:
        """The last commit; a store whose server is gone has nothing more to take."""
        try:
            return self.commit()
        except (StoreUnavailable, Fenced):
            return False

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
        deadline = self.timers.next_due()
        if self.lazy_commit_at is not None:
            deadline = self.lazy_commit_at if deadline is None else min(deadline, self.lazy_commit_at)
        timeout = None if deadline is None else int(max(0.0, (deadline - time.monotonic()) * 1000)) + 1
        ready = dict(self.poller.poll(timeout))
        if self.membership is not None:
            self.membership.check()
        db, outbox = self.store, self.outbox
        db.begin()
        self._handle(ready)
        # Commit, then send, whenever this turn has something to say (acks, results, events, the
        # clock's wake-up): everything acknowledged is durable. A turn with nothing to say (say,
        # results nobody waits for) leaves its writes to the next commit, at most LAZY_COMMIT away.
        lazy_due = self.lazy_commit_at is not None and time.monotonic() >= self.lazy_commit_at
        if outbox.pending or self.tasks.clock_wanted or self.waiters.polling or self.children.stopping or lazy_due:
            self._commit_and_send()
        elif self.lazy_commit_at is None and db.dirty():
            self.lazy_commit_at = time.monotonic() + LAZY_COMMIT
        # Dispatch after the acks. The Run messages may go out before this turn's writes commit
        # (their own RUNNING rows, a journaled submit's insert, results nobody waits for): a crash
        # in between leaves those tasks QUEUED or RUNNING in the store (or in a client's
        # journal), to be run again, which at-least-once allows; their actors die with the
        # supervisor anyway, a node's with its lease. Never before a schedule's fired slot: that
        # must be durable before its task runs, or a restart would fire the slot again.
        # Nothing starts while the store has no room to record it.
        held_back = db.slot_pending
        db.begin()
        if not self.children.stopping and not self.store_held:
            self.intake.page_in()
        if not self.store_held and self.attempts.dispatch():
            if held_back:
                self.commit()
            outbox.flush()
            self.attempts.record_starts()  # while the actors work
            if self.lazy_commit_at is None and db.dirty():  # they ride the next commit
                self.lazy_commit_at = time.monotonic() + LAZY_COMMIT
        elif self.lazy_commit_at is None:
            self.commit()
            outbox.flush()
            db.maintain()
        self.intake.ack_journaled()  # within the turn: a pushed outcome's wait is in place before any end

    def _handle(self, ready: dict[Any, int]) -> None:
        """Everything that is waiting: signals, child exits, messages, due timers."""
        if self.sig_r.fileno() in ready:
            self._on_signals()
        membership = self.membership
        if membership is not None:
            if membership.listen_fd in ready:
                membership.on_notify()
            membership.service()
        template = self.children.template
        if template is not None and (template.fd in ready or template.pending()):
            self.children.on_template_events()
        if self.actor_sock in ready:
            self._drain(self.actor_sock, self._on_actor)
        if self.client_sock in ready:
            self._drain(self.client_sock, self.requests.on_message)
        if self.remote_sock is not None and self.remote_sock in ready:
            self._drain(self.remote_sock, self._on_remote, copy=False)
        self.intake.flush()  # the drains' submits, recorded together
        try:
            self.timers.run_due()
        except StoreFull as exc:  # from _commit_durably: the journal sweep keeps its files for later
            log.warning("%s", exc)
        if self.keys.rekeying:
            self.keys.finish_rekey()

    def commit(self) -> bool:
        """Commit; True when the writes are durable: the acks that were waiting for any commit
        can go with the next flush. With no room (StoreFull), the store keeps the writes in its
        open transaction, so memory and store agree, and what this turn would send after a write
        (an ack, an outcome) waits with those acks for the commit that makes it true."""
        self.intake.flush()  # no commit leaves a batched submit out (a journal replay commits, then unlinks)
        self.attempts.record_starts()  # nor the start of an attempt whose Run is queued
        self.intake.ack_journaled()  # acks that this commit makes true
        self.lazy_commit_at = None
        wrote = self.store.dirty()
        began = time.perf_counter()
        try:
            self.store.commit()
        except StoreFull as exc:
            self._hold(exc, wrote)
            return False
        if wrote and self.tally.enabled:
            self.tally.commit_time.observe(time.perf_counter() - began)
        if self.store_held:
            self.store_held = False
            log.warning("the task store has room again: what waited for it is committed and sent")
        self.outbox.committed()
        return True

    def _hold(self, exc: StoreFull, wrote: bool) -> None:
        """Keep this turn's sends with the acks that wait for a commit; a turn that wrote nothing
        (a status, a wait on a finished task) is answered as usual."""
        if wrote:
            self.outbox.hold()
        if not self.store_held:
            self.store_held = True
            log.error("%s; until then no task starts, new ones are refused, replies that follow a write wait", exc)

    def _retry_store(self) -> None:
        """While the store has no room, make a turn try to commit every STORE_RETRY."""
        if self.store_held:
            self.lazy_commit_at = time.monotonic()
        self.timers.add(STORE_RETRY, self._retry_store)

    def _commit_durably(self) -> None:
        """Intake's commit before it removes the journals it replayed: raise StoreFull unless
        what they held is durable, so that they stay for a later sweep."""
        if not self.commit():
            raise StoreFull("no room in the task store for the submits of dead clients' journals: they stay")

    def _commit_and_send(self) -> None:
        if self.commit():  # the polls and the clock hear of what is durable only
            self.waiters.answer_polls()
            if self.tasks.clock_wanted:
                self._wake_clock()
        self.outbox.flush()
        self.store.maintain()

    def _wake_clock(self) -> None:
        clock = self.children.get("c0")
        if clock is not None and clock.ready:
            self.tasks.clock_wanted = False
            self.outbox.to_actor(clock, messages.Wake("scheduled").encode())

    def _drain(self, sock: Socket, handle: Callable[[Any], None], copy: bool = True) -> None:
        """Handle what waits on ``sock``: bytes frames, or (``copy=False``) zmq.Frames, which
        carry the sender's User-Id (the TCP socket's)."""
        for _ in range(DRAIN_LIMIT):
            if not int(sock.getsockopt(_EVENTS)) & _POLLIN:  # cheaper than ending on zmq.Again
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            try:
                handle(frames)
            except ProtocolError as exc:
                self.dropped += 1
                if self.dropped <= 10 or self.dropped % 1000 == 0:
                    log.warning("dropped a malformed message (%d so far): %s", self.dropped, exc)
            except (StoreUnavailable, Fenced):  # the store's server is gone for good, or we were taken over
                raise
            except Exception:  # our bug: log it and keep serving everyone else
                log.exception("internal error while handling a message; the supervisor goes on")

    def _on_signals(self) -> None:
        try:
            sigs = set(self.sig_r.recv(4096))
        except BlockingIOError:
            return
        if signal.SIGCHLD in sigs:
            self.children.reap()
        if signal.SIGHUP in sigs:
            self._reload_keys()
        if sigs & {signal.SIGTERM, signal.SIGINT}:
            self.attempts.withdraw_held()
            self.children.begin_stop()

    def _reload_keys(self) -> None:
        """SIGHUP: read KEYS/authorized/ again. New keys may connect from now on; a removed key's
        connections are refused from their next message, and its worker node is told and fenced
        (its tasks are retried once it is declared lost, as for any lost node)."""
        if self.keygate is None:
            log.info("SIGHUP: no --bind, so no authorized keys to reload (stop with SIGTERM or SIGINT)")
            return
        added, removed = self.keygate.reload()
        log.warning(
            "SIGHUP: reloaded the authorized keys in %s: added %s, removed %s",
            self.keygate.authorized,
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )
        for name in removed:
            self.node_link.revoke(name)

    def _on_remote(self, parts: list[zmq.Frame]) -> None:
        """The TCP socket carries remote clients, worker nodes and the nodes' actors, each
        message with the User-Id of the key that sent it (``KeyGate``)."""
        user = str(parts[1].get("User-Id")) if len(parts) > 1 else ""
        frames = [part.bytes for part in parts]
        assert self.keygate is not None
        if not self.keygate.allows(user):
            self._from_revoked(user, frames)
            return
        proc = self.children.by_identity(frames[0])
        if proc is not None and proc.spec.node is not None:
            if key_name(user) != proc.spec.node:
                raise ProtocolError(f"a message of actor {proc.spec.slot} came with the key of {key_name(user)!r}")
            self._on_actor(frames)
        elif frames[0].startswith(NODE_PREFIX):
            self.node_link.on_message(frames, key_name(user))
        else:  # a client: the same handlers, its identity marked for the reply
            self.requests.on_message([REMOTE + frames[0], *frames[1:]])

    def _from_revoked(self, user: str, frames: Frames) -> None:
        """A message sent with a key removed since its connection was made: dropped (a client's
        request is answered with KeyRefused)."""
        assert self.keygate is not None
        name = key_name(user)
        self.keygate.say_once(user, f"dropped messages of key {name!r} ({user}): it is no longer authorized")
        if frames[0].startswith(NODE_PREFIX) or self.children.by_identity(frames[0]) is not None or len(frames) < 2:
            return
        req = messages.request_id(frames[1], self.requests.handlers)
        if req is not None:
            why = f"the key {name!r} is no longer authorized by the supervisor at {self.bind_tcp}"
            self.outbox.error(REMOTE + frames[0], req, KeyRefused(why))

    # ---- actor messages ----------------------------------------------------------------------
    def _on_actor(self, frames: Frames) -> None:
        if len(frames) < 2:
            raise ProtocolError("actor message without a header frame")
        proc = self.children.by_identity(frames[0])
        if proc is None:
            return  # an incarnation we already buried
        msg = messages.decode(frames[1])
        proc.last_seen = time.monotonic()
        entry = self.actor_handlers.get(type(msg))
        if entry is None or (entry[1] is not None and proc.spec.role != entry[1]):
            raise ProtocolError(f"{type(msg).__name__} is not a message of actor {proc.spec.slot}")
        entry[0](proc, msg, frames[2:])

    def _on_heartbeat(self, proc: ActorProcess, msg: messages.Heartbeat, payload: Frames) -> None:
        pass  # last_seen was updated above: that is all a heartbeat is for

    def _on_admitted(self, proc: ActorProcess, msg: messages.Admitted, payload: Frames) -> None:
        self.intake.on_admitted(self.keys.on_admitted(proc, msg))

    def _on_promote(self, proc: ActorProcess, msg: messages.Promote, payload: Frames) -> None:
        self.tasks.promote(msg.task_ids)

    def _on_fire(self, proc: ActorProcess, msg: messages.Fire, payload: Frames) -> None:
        if self.membership is not None and not self.membership.clock:
            return  # another cluster member runs the clock
        self.intake.on_fire(msg)

    def _on_due(self, proc: ActorProcess, msg: messages.Due, payload: Frames) -> None:
        self.intake.on_due(msg)

    def _on_hello(self, proc: ActorProcess, msg: messages.Hello, payload: Frames) -> None:
        """Welcome the actor with what its role needs -- the clock the schedule marks, a key
        owner the live keys of its slot, both from the store -- then send the admissions that
        waited for it."""
        if proc.spec.role == ROLE_CLOCK:
            extra: dict[str, Any] = {"schedules": self.store.schedule_marks(), "store": self.store_url}
            self.tasks.clock_wanted = False  # the clock reads the store as it starts
        else:
            extra = {"keys": self.keys.rows_for(proc.spec.slot)}
        self.children.welcome(proc, extra)
        self.keys.actor_up(proc)
        if self.children.all_up():
            self._announce_ready()

    def _on_actor_exit(self, proc: ActorProcess, cause: str) -> None:
        """An actor died (``Children`` restarts its slot after this): what it was asked to admit
        goes to the next owner, and its attempts end."""
        self.keys.actor_gone(proc)
        self.attempts.actor_exited(proc, cause)
        if not proc.stopping and not self.children.stopping:  # died unasked: its slot restarts
            spec = proc.spec
            data = {"slot": spec.slot, "role": spec.role, "node": spec.node, "pid": proc.pid, "cause": cause}
            self.store.add_event(store.ACTOR_EVENT_PREFIX + spec.slot, None, store.ACTOR_EXIT, data)
