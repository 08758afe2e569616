"""The actor program: connect to the supervisor, receive the registry, run attempts, report.

A worker actor runs up to ``concurrency`` attempts at once on its asyncio loop (plain ``def``
tasks in its thread pool). A process-isolated actor is the same program running one attempt at a
time (``serial``): the supervisor sends it the next Run while one runs, so it starts the next task
without waiting for a round trip. Each Done names the held Run that begins next (or a Started
says so), so the supervisor kills and replaces it to cancel or time out exactly that task, and a
crash costs that task only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import logging
import mmap
import os
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import zmq
import zmq.asyncio

from .. import app as app_module
from .. import bootstrap, logs, messages, tracing
from ..errors import SerializationError, TaskCancelled
from ..lifecycle import (
    EXIT_ERROR,
    EXIT_INJECTED_CRASH,
    EXIT_LEASE_LOST,
    EXIT_OK,
    EXIT_PARENT_GONE,
    die_with_parent,
    profiled,
)
from ..session import bind_session, bound_session
from ..transport import RemoteEndpoint, connect
from .keys import KeyTable

log = logging.getLogger("capsule_actors.actor")

HEARTBEAT_INTERVAL = 1.0
RECYCLE_WAIT = 5.0  # past max_process_memory_mb: how long held Runs wait for the supervisor's Stop
WELCOME_TIMEOUT = 30.0
THREAD_POOL_SIZE = 32

# What an actor sends must fit what the supervisor reads: messages.decode refuses a header over
# HEADER_LIMIT bytes (its max_len), and the supervisor's sockets drop any frame over
# max_payload_bytes + FRAME_SLACK (maxmsgsize). So a Done carries its error text and traceback cut
# to these many characters (head and tail, CUT_MARK in between), and every header is measured
# before it is sent (WorkerActor.send).
HEADER_LIMIT = 1 << 20
FRAME_SLACK = 1 << 16
MAX_ERROR_CHARS = 16_384  # copied into each of the task's state events, info and list rows, cards
MAX_TRACEBACK_CHARS = 65_536  # stored once per task, sent with its outcome
CUT_MARK = "\n[capsule_actors: {:,} characters cut]\n"  # ui/card.py recognizes it
SERIAL_WAIT = 0.002  # seconds a process actor's loop waits in place for a plain function's body
ID_BATCH = 100  # items per Promote/Admitted: 100 of two 64-character task ids fit any header limit


class WorkerActor:
    """Runs the attempts the supervisor sends and reports each one's outcome."""

    def __init__(
        self,
        app: app_module.App,
        sock: zmq.Socket,  # type: ignore[type-arg]
        parent: int,
        max_payload: int,
        serial: bool = False,
        slot: str = "",
    ) -> None:
        self.app = app
        self.slot = slot
        self.sock = sock
        self.parent = parent
        self.max_payload = max_payload
        self.running: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        self.serial = asyncio.Lock() if serial else None  # a process actor: one body at a time, in Run order
        self.began: set[str] = set()  # serial: attempts begun or announced as a Done's began_next
        self.dropped: set[str] = set()  # serial: held Runs given back at Stop (the supervisor requeues them)
        self.paused = False  # serial: past max_process_memory_mb after a task, so no held Run begins here
        self.me = psutil.Process()
        self.stopping = False
        self.idle = asyncio.Event()
        self.keys = KeyTable()
        self.pool = concurrent.futures.ThreadPoolExecutor(THREAD_POOL_SIZE, thread_name_prefix="capsule-task")
        self.loop = asyncio.get_running_loop()
        self.drain_pending = False  # a _drain is scheduled already
        self.header_limit = header_limit(max_payload)

    async def serve(self, key_rows: list[tuple[str, list[str]]]) -> None:
        holders = self.keys.rebuild(key_rows)  # before admitting anything new
        if holders:
            self._promote(holders)
        heartbeat = asyncio.create_task(self._heartbeat())
        fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.loop.add_reader(fd, self._drain)
        self._drain()  # what came before the reader was there
        await self.idle.wait()
        self.loop.remove_reader(fd)
        heartbeat.cancel()

    def _drain(self) -> None:
        """Handle every message waiting. The socket's fd only says that its state may have
        changed (edge-triggered): read until EVENTS says nothing is left; ``send`` looks again.
        A plain socket and a reader callback rather than zmq.asyncio: ~100 µs less per message."""
        self.drain_pending = False
        sock = self.sock
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        msg = messages.decode(frames[0])
        if isinstance(msg, messages.Run):
            task = asyncio.create_task(self._perform(msg, frames[1] if len(frames) > 1 else b""))
            task.add_done_callback(functools.partial(self._cancelled_before_start, msg))
            self.running[msg.task_id] = task
        elif isinstance(msg, messages.Admit):
            decisions = [[tid, *self.keys.admit(tid, key, policy)] for tid, key, policy in msg.items]
            for batch in _batches(decisions):
                self.send([messages.Admitted(batch).encode()])
        elif isinstance(msg, messages.Rekey):
            self._promote(self.keys.rebuild([(k, ids) for k, ids in msg.keys]))
        elif isinstance(msg, messages.Release):
            promoted = self.keys.release(msg.task_id, msg.key)
            if promoted is not None:
                self._promote([promoted])
        elif isinstance(msg, messages.CancelRun):
            self._cancel(msg)
        elif isinstance(msg, messages.Withdraw):
            self._withdraw(msg)
        elif isinstance(msg, messages.Stop):
            self._stop()

    def _cancel(self, msg: messages.CancelRun) -> None:
        running = self.running.get(msg.task_id)
        # A serial body that began cannot be stopped from here: the supervisor sees its Started
        # after this cancel and kills the process.
        if running is not None and not (self.serial is not None and msg.task_id in self.began):
            self.cancelled.add(msg.task_id)
            running.cancel()

    def _withdraw(self, msg: messages.Withdraw) -> None:
        """Give back a held Run that has not begun; one that began says so in its Done/Started."""
        task = self.running.get(msg.task_id)
        if self.serial is None or task is None or msg.task_id in self.began or msg.task_id in self.dropped:
            return
        self.dropped.add(msg.task_id)
        task.cancel()
        self.send([messages.Withdrawn(msg.task_id, msg.attempt).encode()])

    def _stop(self) -> None:
        self.stopping = True
        if self.serial is not None:  # a held Run is not started now: give it back
            for task_id, task in self.running.items():
                if task_id not in self.began:
                    self.dropped.add(task_id)
                    task.cancel()
        if not self.running:
            self.idle.set()

    def _promote(self, holders: list[str]) -> None:
        """Promote in batches: a Rekey can hand this actor more keys than one header holds."""
        for batch in _batches(holders):
            self.send([messages.Promote(batch).encode()])

    def send(self, frames: list[bytes]) -> None:
        """Send on the loop's thread (sndhwm=0: never blocks once connected), in call order. A
        send can consume the fd's edge for a message that arrived meanwhile: look again. A header
        the supervisor could not read is refused here, so it is never dropped there unseen."""
        check_header(frames[0], self.header_limit, "a message")
        self.sock.send_multipart(frames)
        if not self.drain_pending and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self.drain_pending = True
            self.loop.call_soon(self._drain)

    def _cancelled_before_start(self, run: messages.Run, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never runs _perform's cleanup: report it here."""
        if task.cancelled() and self.running.get(run.task_id) is task:
            self._not_begun(run)

    def _not_begun(self, run: messages.Run) -> None:
        """An attempt cancelled before its body began: say so, unless it was given back at Stop."""
        del self.running[run.task_id]
        self.cancelled.discard(run.task_id)
        if run.task_id in self.dropped:
            self.dropped.discard(run.task_id)
        else:
            self._send_done(self._done(run, "cancelled", "TaskCancelled", "cancelled before it started"), b"")
        if self.stopping and not self.running:
            self.idle.set()

    async def _heartbeat(self) -> None:
        while True:
            self.send([messages.Heartbeat(len(self.running)).encode()])
            if os.getppid() != self.parent:
                os._exit(EXIT_PARENT_GONE)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _perform(self, run: messages.Run, payload: bytes) -> None:
        if self.serial is not None:
            try:
                await self.serial.acquire()  # the attempt before it ends first
            except asyncio.CancelledError:
                self._not_begun(run)
                return
            if run.held and run.task_id not in self.began:  # no Done announced it as began_next
                self.send([messages.Started(run.task_id, run.attempt).encode()])
            self.began.add(run.task_id)
        if run.crash:
            os._exit(EXIT_INJECTED_CRASH)  # testing.crash_on_attempt asked for this attempt to die
        try:
            done, frame = await self._attempt(run, payload)
        except Exception as exc:  # outside the body (an unknown task, a session that cannot bind)
            done, frame = self._done(run, "error", type(exc).__qualname__, _text(exc), _traceback(exc)), b""
        finally:
            self.running.pop(run.task_id, None)
            self.cancelled.discard(run.task_id)
            if self.serial is not None:
                self.began.discard(run.task_id)
                if self.running and not self.stopping and self._over_memory():
                    self._pause()
                else:
                    self.serial.release()
        if self.serial is not None:
            done = dataclasses.replace(done, began_next="" if self.paused else self._next_to_begin())
        self._send_done(done, frame)
        if self.stopping and not self.running:
            self.idle.set()

    def _send_done(self, done: messages.Done, frame: bytes) -> None:
        """Every attempt ends with a Done the supervisor can read, or it would stay RUNNING."""
        self.send([fitted(done, self.header_limit), frame])

    def _over_memory(self) -> bool:
        limit = self.app.max_process_memory_mb
        return limit is not None and self.me.memory_info().rss > limit * 2**20

    def _pause(self) -> None:
        """Past max_process_memory_mb with Runs held: keep the lock, so none begins here. The
        supervisor's memory check at this Done sends Stop, which gives them back to run on the
        replacement. Should that check disagree (no Stop within RECYCLE_WAIT), go on."""
        self.paused = True
        self.loop.call_later(RECYCLE_WAIT, self._resume)

    def _resume(self) -> None:
        if self.paused and self.serial is not None:
            self.paused = False
            self.serial.release()

    def _next_to_begin(self) -> str:
        """The held Run that begins once this Done is sent (the lock passes to it in Run order):
        announced in the Done, so no Started message is needed for it."""
        for task_id in self.running:
            if task_id not in self.dropped and task_id not in self.cancelled:
                self.began.add(task_id)
                return task_id
        return ""

    async def _attempt(self, run: messages.Run, payload: bytes) -> tuple[messages.Done, bytes]:
        task = self.app.get_task(run.name)
        session = channel = None
        if run.session_id:
            channel = _AttemptChannel(self, run)
            session = bound_session(run.session_id, run.session_owner, channel, self.app)
        bind_session(session)
        logs.current_attempt.set((run.task_id, run.name, run.attempt))
        span = tracing.start_attempt(run, self.slot)  # None unless the app uses OpenTelemetry
        try:
            done, frame = await self._run_body(run, task, session, payload)
        except BaseException:
            tracing.cut_attempt(span)
            raise
        else:
            return tracing.end_attempt(span, done), frame
        finally:
            if channel is not None:
                channel.open = False  # a session kept past its attempt must not talk any more

    async def _run_body(
        self, run: messages.Run, task: app_module.Task[Any, Any], session: Any, payload: bytes
    ) -> tuple[messages.Done, bytes]:
        timer = asyncio.timeout(run.timeout)
        try:
            args, kwargs = cloudpickle.loads(payload)
            if task.accepts_session and "session" not in kwargs:
                kwargs["session"] = session
            async with timer:
                if task.is_async:
                    value = await task.fn(*args, **kwargs)
                else:
                    call = functools.partial(contextvars.copy_context().run, task.fn, *args, **kwargs)
                    value = await self._call(call, session is not None)
            return self._done(run, "ok"), self._dumps(value)
        except asyncio.CancelledError:
            if run.task_id not in self.cancelled:
                raise
            return self._done(run, "cancelled", "TaskCancelled", "cancelled by request"), b""
        except TimeoutError as exc:
            if timer.expired():
                return self._done(
                    run,
                    "timeout",
                    "TaskTimeout",
                    f"attempt {run.attempt} ran past timeout={run.timeout} s",
                    retryable=True,
                ), b""
            return self._failure(run, task, exc)
        except TaskCancelled as exc:
            return self._done(run, "cancelled", "TaskCancelled", str(exc)), b""
        except BaseException as exc:  # the task's own error, whatever it is, is its outcome
            return self._failure(run, task, exc)

    async def _call(self, call: Callable[[], Any], session: bool) -> Any:
        """A plain function's body, on the pool. A process actor runs one body at a time: it
        waits up to SERIAL_WAIT for it right here, without a turn of the loop (a short body's
        result then costs no wake-up of the loop), and on the loop for a longer one. With a
        session, one turn of the loop follows, so the events the body emitted from its thread
        go out before the attempt's Done."""
        future = self.pool.submit(call)
        if self.serial is not None:
            try:
                value = future.result(SERIAL_WAIT)
            except TimeoutError:
                if future.done():  # the body's own TimeoutError
                    raise
            else:
                if session:
                    await asyncio.sleep(0)
                return value
        return await asyncio.wrap_future(future)

    def _failure(
        self, run: messages.Run, task: app_module.Task[Any, Any], exc: BaseException
    ) -> tuple[messages.Done, bytes]:
        try:
            frame = cloudpickle.dumps(exc, protocol=5)
            cloudpickle.loads(frame)  # an exception that cannot come back is sent as text only
        except Exception:
            frame = b""
        if len(frame) > self.max_payload:
            frame = b""
        retryable = task.retryable(type(exc))
        return self._done(run, "error", type(exc).__qualname__, _text(exc), _traceback(exc), retryable), frame

    def _dumps(self, value: Any) -> bytes:
        try:
            frame: bytes = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise SerializationError(f"the task's result cannot be pickled: {exc!r}") from exc
        if len(frame) > self.max_payload:
            raise SerializationError(f"the task's result is {len(frame)} bytes pickled, over max_payload_bytes")
        return frame

    @staticmethod
    def _done(
        run: messages.Run, outcome: str, etype: str = "", emsg: str = "", tb: str = "", retryable: bool = False
    ) -> messages.Done:
        """A Done with texts msgpack can encode; ``fitted`` cuts them to size when it is sent."""
        return messages.Done(run.task_id, run.attempt, outcome, _utf8(etype), _utf8(emsg), _utf8(tb), retryable)


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    """``items`` in runs of ID_BATCH; one empty run for none (every Admit and Rekey is answered)."""
    for start in range(0, max(len(items), 1), ID_BATCH):
        yield items[start : start + ID_BATCH]


def header_limit(max_payload: int) -> int:
    """The largest header the supervisor takes from an actor: what decode accepts and the socket passes."""
    return min(HEADER_LIMIT, max_payload + FRAME_SLACK)


def check_header(header: bytes, limit: int, what: str) -> None:
    """Refuse a header the supervisor would drop as malformed, naming its size and the limit."""
    if len(header) > limit:
        raise SerializationError(
            f"{what} would be {len(header):,} bytes as a message header, over the {limit:,}-byte limit: "
            "send less, or a reference to it (a path, a key)"
        )


def clip(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: its head and its tail around a CUT_MARK that says
    how many were cut (the head holds a traceback's frames, the tail where the error ended)."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(CUT_MARK.format(len(text))))  # the longest mark this cut can need
    if keep == 0:
        return text[:limit]
    head = keep - keep // 2
    return text[:head] + CUT_MARK.format(len(text) - keep) + text[len(text) - keep // 2 :]


def fitted(done: messages.Done, limit: int) -> bytes:
    """``done`` encoded within ``limit`` bytes: its texts cut to their bounds, tighter when the limit
    needs it (a small max_payload_bytes), or dropped, saying why, when even its other fields leave
    no room (a huge exception type name). The attempt ends either way; the pickled exception, a
    frame of its own, keeps the texts whole."""
    if len(done.error_message) <= MAX_ERROR_CHARS and len(done.traceback) <= MAX_TRACEBACK_CHARS:
        header = done.encode()  # every Done of a task that did not fail, and most that did: one encode
        if len(header) <= limit:
            return header
    bare = len(dataclasses.replace(done, error_message="", traceback="").encode())
    room = (limit - bare - 16) // 8  # characters per text that fit whatever they are: UTF-8 <= 4 bytes each
    if room < 1024:
        return _oversized(done, bare, limit).encode()
    header = _cut(done, MAX_ERROR_CHARS, MAX_TRACEBACK_CHARS).encode()
    if len(header) > limit:
        header = _cut(done, min(MAX_ERROR_CHARS, room), min(MAX_TRACEBACK_CHARS, room)).encode()
    return header


def _cut(done: messages.Done, error_chars: int, traceback_chars: int) -> messages.Done:
    """``done`` with its error text and traceback clipped to these many characters."""
    error, tb = clip(done.error_message, error_chars), clip(done.traceback, traceback_chars)
    return dataclasses.replace(done, error_message=error, traceback=tb)


def _oversized(done: messages.Done, size: int, limit: int) -> messages.Done:
    """The Done that replaces one with no room for its texts: small whatever the task raised."""
    name = (
        done.error_type
        if len(done.error_type) <= 100
        else f"{done.error_type[:100]}… ({len(done.error_type):,} characters)"
    )
    error = (
        f"the attempt ended with {name!r} ({done.outcome}), but its fields without "
        f"the error text already take {size:,} bytes of the {limit:,}-byte limit of a message header: "
        "the error text was dropped"
    )
    return dataclasses.replace(done, error_type="TaskFailed", error_message=error, traceback="")


def _utf8(text: str) -> str:
    """``text`` as msgpack can send it: lone surrogates (undecodable file names) escaped."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _text(exc: BaseException) -> str:
    """``str(exc)``, or what says it failed: an error's own __str__ must not lose its outcome."""
    try:
        return str(exc)
    except Exception as err:
        return f"<str() of {type(exc).__qualname__} failed: {type(err).__qualname__}>"


def _traceback(exc: BaseException) -> str:
    """The exception's traceback text (``traceback`` copes with a failing __str__ itself)."""
    return "".join(traceback.format_exception(exc))


class _AttemptChannel:
    """Sends one attempt's session events over the actor's socket, from the loop or a pool thread,
    in the order they were made (and before the attempt's Done)."""

    __slots__ = ("actor", "loop", "loop_thread", "open", "run")

    def __init__(self, actor: WorkerActor, run: messages.Run) -> None:
        self.actor = actor
        self.run = run
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.open = True

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if not self.open:
            from ..errors import ConfigError

            raise ConfigError(
                f"session {self.run.session_id!r}: its task attempt has ended; "
                "reply/notify/stream/progress work only while the task runs"
            )
        frames = [self._header(kind, data)]
        if threading.get_ident() == self.loop_thread:
            self.actor.send(frames)
        else:
            self.loop.call_soon_threadsafe(self.actor.send, frames)

    def _header(self, kind: str, data: dict[str, Any]) -> bytes:
        """The Emit header, or SerializationError in the task's own call when the supervisor
        could not read it: nothing is sent, and the task may go on."""
        try:
            header = messages.Emit(self.run.task_id, self.run.attempt, kind, data).encode()
        except (TypeError, ValueError, OverflowError) as exc:  # lone surrogates, ints past 64 bits
            raise SerializationError(f"session {kind} cannot be sent: {exc}") from None
        check_header(header, self.actor.header_limit, f"session {kind}")
        return header


@dataclasses.dataclass(frozen=True)
class ActorArgs:
    """Who a new actor is and where its supervisor listens (sent by the supervisor to the template)."""

    slot: str
    gen: int
    role: str
    endpoint: str
    server_key: str | None
    state_dir: str  # "" on a worker node: the supervisor's state directory is on another host
    parent: int  # the template that forked it
    client_keys: list[str] | None = None  # a node's CURVE key pair (public, secret) for its actors
    lease_file: str | None = None  # a node's lease: run only while it is valid (see node.py)

    def client_config(self) -> bootstrap.ClientConfig:
        """Where this actor's tasks submit (and session.db goes): its supervisor, through the
        state directory on this host, or over the node's TCP link with the node's key pair."""
        if self.state_dir:
            return bootstrap.ClientConfig(Path(self.state_dir))
        assert self.client_keys is not None and self.server_key is not None
        remote = RemoteEndpoint(self.endpoint, self.server_key, self.client_keys[0], self.client_keys[1])
        return bootstrap.ClientConfig(Path(), remote)


def _dealer(ctx: zmq.Context, args: ActorArgs) -> Any:  # type: ignore[type-arg]
    """The actor's one socket to its supervisor (identity ``slot.gen``)."""
    sock = ctx.socket(zmq.DEALER)
    sock.identity = f"{args.slot}.{args.gen}".encode()
    sock.linger = 2000  # the last results reach the supervisor before we exit
    sock.sndhwm = 0
    sock.rcvhwm = 0
    connect(
        sock, args.endpoint, args.server_key, (args.client_keys[0], args.client_keys[1]) if args.client_keys else None
    )
    return sock


def _welcome(frames: list[bytes]) -> messages.Welcome:
    welcome = messages.decode(frames[0])
    if not isinstance(welcome, messages.Welcome):
        raise SystemExit(f"expected Welcome from the supervisor, got {type(welcome).__name__}")
    return welcome


async def _serve(args: ActorArgs, app: app_module.App) -> None:
    hello = [messages.Hello(args.slot, args.gen, os.getpid(), args.role).encode()]
    if args.role == "clock":  # it polls with timeouts: zmq.asyncio suits it
        from .clock import ClockActor

        actx = zmq.asyncio.Context()
        asock: zmq.asyncio.Socket = _dealer(actx, args)
        try:
            await asock.send_multipart(hello)
            welcome = _welcome(await asyncio.wait_for(asock.recv_multipart(), WELCOME_TIMEOUT))
            await ClockActor(app, asock, welcome.config).serve()
        finally:
            asock.close()
            actx.term()
        return
    ctx = zmq.Context()
    sock: zmq.Socket = _dealer(ctx, args)  # type: ignore[type-arg]  # read by a loop callback (WorkerActor._drain)
    try:
        sock.send_multipart(hello)
        if not sock.poll(int(WELCOME_TIMEOUT * 1000)):  # nothing else runs yet: wait in place
            raise TimeoutError(f"no Welcome from the supervisor within {WELCOME_TIMEOUT:.0f} s")
        welcome = _welcome(sock.recv_multipart())
        actor = WorkerActor(
            app, sock, args.parent, app.max_payload_bytes, serial=args.role == "process", slot=args.slot
        )
        await actor.serve([(k, ids) for k, ids in welcome.config.get("keys", [])])
    finally:
        sock.close()
        ctx.term()


def run_actor(args: ActorArgs, app: app_module.App) -> None:
    """The life of an actor process, right after the template forked it; never returns."""
    logs.configure("WARNING", tag=args.slot, force=True)
    die_with_parent(args.parent)
    if args.lease_file:
        watch_lease(args.lease_file)
    bootstrap.configure_process(args.client_config())
    if app.on_actor_start is not None and args.role != "clock":  # the clock runs no user code
        try:
            app.on_actor_start()
        except Exception:
            log.exception("App(on_actor_start=...) raised in actor %s; it runs tasks all the same", args.slot)
    code = EXIT_OK
    try:
        profiled(args.slot, lambda: asyncio.run(_serve(args, app)))
    except BaseException:
        log.exception("actor %s failed", args.slot)
        code = EXIT_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait for thread-pool calls that ignore the stop


def watch_lease(path: str) -> None:
    """Fence this actor: exit the moment its node's lease from the supervisor runs out.

    The node writes the lease's end (CLOCK_MONOTONIC seconds, shared by every process on the host)
    into an 8-byte file that this thread reads. A thread, not the event loop, so a task that hogs
    the loop cannot keep a cut-off actor running; and the actor's own check, not only the node's
    kill, so a frozen node cannot either. The supervisor waits longer than the lease before it
    retries the node's tasks elsewhere, so a key is never run twice at once.
    """
    fd = os.open(path, os.O_RDONLY)
    lease = mmap.mmap(fd, _LEASE.size, prot=mmap.PROT_READ)
    os.close(fd)

    def watch() -> None:
        while True:
            (until,) = _LEASE.unpack_from(lease, 0)
            left = until - time.monotonic()
            if left <= 0:
                os._exit(EXIT_LEASE_LOST)
            time.sleep(min(left, 0.1))

    threading.Thread(target=watch, name="capsule-lease", daemon=True).start()


_LEASE = struct.Struct("=d")
