"""A process's link to one supervisor: a DEALER socket, an I/O thread, and callers that drive it.

Every request gets a ``concurrent.futures.Future``, so the sync API blocks only its caller and the
async API never blocks the event loop. One thread at a time drives the socket (``_owner``): sends
what is queued, reads every reply and resolves its future, follows the monitor's events. A sync
caller that waits for a reply drives it itself while nobody else does (``_lead``: the reply wakes
that caller, not the I/O thread, which stops watching the socket meanwhile), and a lone request
leaves from its caller's thread (``_drive``); otherwise callers queue requests in a deque and
kick the I/O thread through an eventfd (a burst, one kick), and the I/O thread drives the socket.
The I/O thread alone reconnects: a caller gives the socket back when the supervisor goes. Every
request stays outstanding until its reply arrives; when the supervisor restarts, the socket
reconnects and every outstanding request is sent again. The protocol makes that safe: task ids
are made by clients, so a resent submit is ignored. What the requests mean (submits, acks,
journals, pushed outcomes) is ``client.py``'s.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import messages
from .bootstrap import ClientConfig
from .errors import KeyRefused, NotRunning, ProtocolError, error_from_reply
from .lifecycle import current_pid
from .transport import (
    HANDSHAKE_EVENTS,
    LOCK_FILE,
    REMOTE_TIMEOUT_ENV,
    Handshakes,
    RuntimeFile,
    connect,
    handshake_refusal,
    read_runtime_file,
    stale_runtime_file,
)

log = logging.getLogger("capsule_actors.client")

Reply = tuple[Any, list[bytes]]
Future = concurrent.futures.Future[Reply]
_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_IO = -1  # Connection._owner while the I/O thread drives the socket (else a waiting caller's thread id)
REPLY_LIMIT = 64 << 20  # a reply header from our supervisor (event pages, task lists) may pass 1 MiB
_REFRESH_INTERVAL = 0.25  # while disconnected: re-read supervisor.json for a moved endpoint
START_HINT = "start one with `capsule-actors run MODULE:APP` (a service), or `with app.start():` (embedded)"


def not_running(config: ClientConfig, why: str = "") -> NotRunning:
    """The error for a state directory that no supervisor serves; ``why`` adds what is known."""
    return NotRunning(
        f"no capsule_actors supervisor is running for state directory {config.where!r}{why}; {START_HINT}"
    )


def stale_note(config: ClientConfig) -> str:
    """Why a supervisor.json that is there does not count, so nobody goes looking for pid N."""
    stale = stale_runtime_file(config.state_dir) if config.remote is None else None
    if stale is None:
        return ""
    return (
        f" (supervisor.json names pid {stale.pid}, but no supervisor holds {LOCK_FILE}: "
        "it was left by one that did not stop, say before a reboot)"
    )


class Connection:
    """Requests and their replies on one socket; reconnects and resends on its own."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._remote = config.remote
        info = read_runtime_file(config.state_dir) if self._remote is None else self._remote.runtime_file()
        if info is None:
            raise not_running(config, stale_note(config))
        self._info: RuntimeFile = info
        self._pid = current_pid()
        self._ids = itertools.count(1)
        self._outstanding: dict[int, tuple[list[bytes], Future]] = {}
        self._expected: set[int] = set()  # outstanding replies asked for by another request (expect)
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._kicked = False  # a wake-up is pending: the I/O thread will look at the outbox anyway
        self.closed = False
        self._reset = False
        self.connected = False
        self.refused: KeyRefused | None = None  # the supervisor over TCP refused our handshake
        self._handshakes = Handshakes()
        # who drives the socket now (``_owner``): nobody, the I/O thread, or one caller waiting for a
        # reply, which then does the I/O thread's turns itself (``_lead``); ``_baton`` guards it
        self._owner: int | None = None
        self._baton = threading.Condition(threading.Lock())
        self._sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self._monitor: zmq.Socket | None = None  # type: ignore[type-arg]
        self._fd = self._monitor_fd = -1  # their fds, polled by whoever waits (select.poll)
        self._io_poll = select.epoll()  # the I/O thread's (a caller that leads mutes the socket's fd in it)
        self._lead_poll = select.poll()  # the caller's that leads (one at a time)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capsule-client-io", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def pid(self) -> int:
        """The process that made it (a forked child must make its own)."""
        return self._pid

    def outstanding(self) -> int:
        """Requests (sent or expected) whose reply has not come."""
        return len(self._outstanding)

    # ---- requests ----------------------------------------------------------------------------
    def request(
        self,
        make: Callable[[int], messages.Message],
        frames: list[bytes] | None = None,
        record: Callable[[list[bytes]], None] | None = None,
    ) -> Future:
        """Send ``make(req_id)`` (plus payload frames); the future resolves with (body, frames).
        ``record(message)`` runs first (the submit journal's write): if it raises, nothing is sent."""
        if self.closed:
            raise not_running(self.config)
        if self.refused is not None:
            raise self.refused
        req = next(self._ids)
        msg = [make(req).encode(), *(frames or ())]
        if record is not None:
            record(msg)
        fut: Future = concurrent.futures.Future()
        fut.req = req  # type: ignore[attr-defined]
        fut.pid = self._pid  # type: ignore[attr-defined]
        idle = len(self._outstanding) == len(self._expected)  # no request unanswered, pushes aside
        self._outstanding[req] = (msg, fut)
        self._outbox.append(msg)
        if not (idle and self._drive()):  # a lone request leaves from here; a burst, one kick
            self._kick()
        if self.closed and not fut.done():  # closed meanwhile: nobody will answer on this connection
            fut.set_exception(not_running(self.config))
        return fut

    def expect(self, make: Callable[[int], messages.Message]) -> Future:
        """A reply that another request asks for (a Submit's ``push``): not sent now, but
        ``make(req)`` goes out like any unanswered request if the socket has to reconnect."""
        if self.closed:
            raise not_running(self.config)
        req = next(self._ids)
        fut: Future = concurrent.futures.Future()
        fut.req = req  # type: ignore[attr-defined]
        fut.pid = self._pid  # type: ignore[attr-defined]  # a forked child must not wait on it
        self._expected.add(req)
        self._outstanding[req] = ([make(req).encode()], fut)
        return fut

    def discard(self, fut: Future) -> None:
        """Stop expecting a reply that will not come (e.g. a rejected submit's push)."""
        self._outstanding.pop(fut.req, None)  # type: ignore[attr-defined]
        self._expected.discard(fut.req)  # type: ignore[attr-defined]

    async def await_reply(self, fut: Future) -> Reply:
        return self._check(await asyncio.wrap_future(fut))

    def wait_reply(self, fut: Future, timeout: float | None, must_run: bool = False) -> Reply:
        """Wait for a reply. With ``must_run``, give up with NotRunning once no supervisor is
        left to answer (used by submits: over TCP, after the endpoint's timeout); otherwise wait
        through supervisor restarts."""
        if must_run and self._remote is not None and (timeout is None or timeout > self._remote.timeout):
            try:
                return self.wait_reply(fut, self._remote.timeout)
            except concurrent.futures.TimeoutError:
                self._withdraw(fut)
                raise NotRunning(
                    f"no answer from the supervisor at {self._remote.address} within {self._remote.timeout:g} s "
                    f"(${REMOTE_TIMEOUT_ENV}); the request was withdrawn: is the supervisor up and reachable?"
                ) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        gone_since: float | None = None
        while True:
            step = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                return self._check(self._result(fut, step))
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if (
                must_run
                and not self.connected
                and self._remote is None
                and read_runtime_file(self.config.state_dir) is None
            ):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 5.0:
                    self._withdraw(fut)
                    raise NotRunning(
                        f"the supervisor for {self.config.where!r} stopped before it "
                        f"acknowledged this request, which was withdrawn; {START_HINT}"
                    )
            else:
                gone_since = None

    def _result(self, fut: Future, timeout: float) -> Reply:
        """``fut.result(timeout)``, leading (``_lead``) while this caller can."""
        deadline = time.monotonic() + timeout
        if not fut.done():
            self._lead(fut, deadline)
        return fut.result(max(0.0, deadline - time.monotonic()))

    def _may_lead(self) -> bool:
        """Whether a caller may drive the socket: the I/O thread alone reconnects and reopens."""
        return self.connected and not self.closed and not self._reset and self.refused is None

    def _lead(self, fut: Future, deadline: float) -> None:
        """Wait for ``fut`` on the socket itself, doing the I/O thread's turns (sends, replies,
        monitor events, for every thread), unless another caller already does: then the reply
        wakes this thread directly, not through the I/O thread. Gives up the socket when ``fut``
        is done, at ``deadline``, or when the I/O thread must reconnect (``_may_lead``)."""
        if not self._own(True):
            return  # another caller leads (and resolves fut for us), or the I/O thread must
        # the I/O thread stops watching the socket meanwhile: a reply then wakes this thread alone
        self._io_poll.modify(self._fd, 0)
        try:
            ready: list[int] = [self._wake] if self._kicked else []
            while True:
                self._turn(ready)
                if fut.done() or not self._may_lead():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                ready = [fd for fd, _ in self._lead_poll.poll(left * 1000)]
        finally:
            self._io_poll.modify(self._fd, select.EPOLLIN)  # what came since the last drain wakes it
            self._give()
            if not self.connected:  # this turn saw the supervisor go: the I/O thread follows it
                self._kick()

    def _drive(self) -> bool:
        """Send what is queued from the caller's thread, when nobody drives the socket."""
        if not self._own(False):
            return False
        try:
            self._turn(())
        finally:
            self._give()
        return True

    def _own(self, after_io: bool) -> bool:
        """Take the socket for this caller if nobody else has it (``after_io``: once the I/O
        thread's turn under way ends; a turn never blocks, but an event loop does not wait)."""
        if threading.current_thread() is self._thread:
            return False  # a callback of the I/O thread's turn: it kicks, the turn flushes next
        with self._baton:
            while after_io and self._owner == _IO:
                self._baton.wait()
            if self._owner is not None or not self._may_lead():
                return False
            self._owner = threading.get_ident()
            return True

    def _give(self) -> None:
        with self._baton:
            self._owner = None
            self._baton.notify_all()

    def call(
        self,
        make: Callable[[int], messages.Message],
        frames: list[bytes] | None = None,
        timeout: float | None = None,
        must_run: bool = False,
    ) -> Reply:
        """request() and wait; raise the supervisor's error reply as our exception."""
        return self.wait_reply(self.request(make, frames), timeout, must_run)

    async def acall(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Reply:
        fut = self.request(make, frames)
        try:
            return self._check(await asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            self.forget(fut)
            raise

    @staticmethod
    def _check(reply: Reply) -> Reply:
        ok, body, frames = reply[0][0], reply[0][1], reply[1]
        if not ok:
            raise error_from_reply(body)
        return body, frames

    def _withdraw(self, fut: Future) -> None:
        """Take back an unacknowledged request: drop it from the outbox and have the I/O thread
        open a fresh socket, discarding whatever ZeroMQ still queued for the old one, so a
        supervisor that comes back never receives a submit its caller was told had failed.
        (Other outstanding requests are sent again on the new socket.)"""
        req = fut.req  # type: ignore[attr-defined]
        entry = self._outstanding.pop(req, None)
        if entry is not None:
            try:
                self._outbox.remove(entry[0])
            except ValueError:
                pass
        self._reset = True
        self._kick()

    def forget(self, fut: Future) -> None:
        """Stop waiting for a request's reply and tell the supervisor to drop its waiter."""
        req = fut.req  # type: ignore[attr-defined]
        if self._outstanding.pop(req, None) is not None and not self.closed:
            self._outbox.append([messages.Forget(req).encode()])
            self._kick()

    def _kick(self) -> None:
        """Wake the I/O thread, unless a wake-up is already pending (a burst of submits then costs
        one syscall, not one each); a no-op once it has ended (and closed the eventfd)."""
        if self._kicked:
            return
        with self._wake_lock:
            if self._wake >= 0 and not self._kicked:
                self._kicked = True
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._kick()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        for _, fut in list(self._outstanding.values()):
            if not fut.done():
                fut.set_exception(not_running(self.config))
        self._outstanding.clear()
        self._expected.clear()

    # ---- the I/O thread ----------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context()
        self._open(ctx)
        self._ready.set()
        ready: list[int] = [self._wake, self._fd, self._monitor_fd]  # a new socket: look at each once
        try:
            while not self.closed:
                if self._take():
                    try:
                        self._turn(ready)
                        if self._reset or (not self.connected and self._endpoint_moved()):
                            self._reset = False
                            self._close_socket()
                            self.connected = False
                            self._ever_connected = True  # the new socket's first connect resends the rest
                            self._open(ctx)
                            ready = [self._wake, self._fd, self._monitor_fd]
                            continue
                    finally:
                        self._give()
                if self._outbox:
                    timeout: int | None = 10
                else:
                    timeout = None if self.connected else int(_REFRESH_INTERVAL * 1000)
                ready = [fd for fd, _ in self._io_poll.poll(-1 if timeout is None else timeout / 1000)]
        finally:
            self.closed = True  # before _take: a caller that leads gives the socket back at once
            self._take()
            self._close_socket()
            ctx.term()
            self._io_poll.close()
            self._give()
            with self._wake_lock:
                os.close(self._wake)
                self._wake = -1

    def _take(self) -> bool:
        """The I/O thread takes the socket, once a caller that leads has left; False when that
        caller left nothing to do (it read the wake-up and drained the socket)."""
        with self._baton:
            led = False
            while self._owner is not None:
                led = True
                self._baton.wait()
            if led and not (self._reset or self.closed):  # what it left shows in the next poll
                return False
            self._owner = _IO
            return True

    def _turn(self, ready: Collection[int]) -> None:
        """One turn of whoever drives the socket, given the fds a poll found readable: take the
        wake-up, the monitor's events, send what is queued, then every reply. A socket's fd only
        says "look at EVENTS", and a send may take the signal of a reply that came meanwhile, so
        the replies are drained after every send: a poll then never misses what came."""
        sock, monitor = self._sock, self._monitor
        assert sock is not None and monitor is not None
        if self._wake in ready:
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            # after the read (a kick between them would be lost with the flag still set,
            # and every later kick skipped) and before the flush (what is queued after
            # this line kicks again; what was queued before is flushed now)
            self._kicked = False
        busy = bool(self._outbox)
        if self._monitor_fd in ready:
            self._on_monitor(sock, monitor)
            busy = True  # it may have resent
        if busy:
            self._flush(sock)
        if busy or self._fd in ready:
            self._receive(sock)

    def _flush(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        while self._outbox:
            frames = self._outbox[0]
            try:  # int flags: pyzmq's send_multipart spends more on flag enums than on sending
                sock.send(frames[0], _NOBLOCK_MORE if len(frames) > 1 else _NOBLOCK, copy=False)
            except zmq.Again:
                return  # no peer pipe yet: try again on the next turn
            for i in range(1, len(frames)):  # the first part went: the rest cannot block
                sock.send(frames[i], _NOBLOCK_MORE if i < len(frames) - 1 else _NOBLOCK, copy=False)
            self._outbox.popleft()

    def _open(self, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0  # never drop or block a request; memory is bounded by the callers
        sock.rcvhwm = 0
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS | (HANDSHAKE_EVENTS if self._remote else 0))
        keys = (self._remote.client_public, self._remote.client_secret) if self._remote else None
        connect(sock, self._info.client, self._info.server_public, keys)
        self._sock, self._monitor = sock, monitor
        self._fd, self._monitor_fd = int(sock.FD), int(monitor.FD)
        self._io_poll.close()
        self._io_poll, self._lead_poll = select.epoll(), select.poll()
        for fd in (self._wake, self._fd, self._monitor_fd):
            self._io_poll.register(fd, select.EPOLLIN)
            self._lead_poll.register(fd, select.POLLIN)

    def _close_socket(self) -> None:
        sock, monitor = self._sock, self._monitor
        if sock is None or monitor is None:
            return
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)

    def _receive(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        while int(sock.getsockopt(_EVENTS)) & _POLLIN:  # cheaper than ending on zmq.Again
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = messages.decode(frames[0], REPLY_LIMIT)
            except ProtocolError as exc:
                log.error("dropped a malformed reply: %s", exc)
                continue
            if not isinstance(reply, messages.Reply):
                continue
            entry = self._outstanding.pop(reply.req, None)
            self._expected.discard(reply.req)
            if entry is not None and not entry[1].done():
                entry[1].set_result(((reply.ok, reply.body), frames[1:]))

    _ever_connected = False

    def _on_monitor(self, sock: zmq.Socket, monitor: zmq.Socket) -> None:  # type: ignore[type-arg]
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                was_lost = self._ever_connected and not self.connected
                self.connected = self._ever_connected = True
                if was_lost:  # a restarted supervisor: send everything still unanswered again,
                    # the waits that submits asked for after the submits themselves
                    unanswered = list(self._outstanding.items())
                    self._outbox.extend(msg for req, (msg, _) in unanswered if req not in self._expected)
                    self._outbox.extend(msg for req, (msg, _) in unanswered if req in self._expected)
                    self._flush(sock)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
            elif self._remote is not None and event["event"] & HANDSHAKE_EVENTS:
                if self._handshakes.refused(event["event"]):
                    self._on_refused(KeyRefused(handshake_refusal(event["event"], self._remote)))
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.refused = None

    def _on_refused(self, exc: KeyRefused) -> None:
        """The supervisor refused our key (or we hold the wrong server key): every request waiting
        fails now, and new ones at once, until a later handshake succeeds (ZeroMQ keeps trying)."""
        self.refused = exc
        for req, (_, fut) in list(self._outstanding.items()):
            self._outstanding.pop(req, None)
            self._expected.discard(req)
            if not fut.done():
                fut.set_exception(exc)
        self._outbox.clear()

    def _endpoint_moved(self) -> bool:
        """While disconnected, follow the supervisor to a new endpoint (tcp fallback ports)."""
        if self._remote is not None:
            return False  # a fixed tcp:// endpoint: ZeroMQ reconnects to it by itself
        info = read_runtime_file(self.config.state_dir)
        if info is None or (info.client, info.server_public) == (self._info.client, self._info.server_public):
            return False
        self._info = info
        self._ever_connected = True  # the new socket's first connect must resend
        return True
