"""A process's client of one supervisor: submits, their acks and journal, pushed outcomes.

``Client.shared(config)`` is the one client per (process, supervisor); ``App.client()`` finds it
from the configuration the process was started with (``bootstrap.py``). It owns the connection
(``connection.py``) and what the requests mean:

- **Submits.** A ``map()`` is split into Submit messages that each record atomically. Each item
  asks the supervisor to push its outcome (``push``): the reply to that request id is the
  outcome, so ``result()`` costs no round trip of its own.
- **The submit journal** (``journal.py``). On this host, an unlocked submit of a task name the
  supervisor has accepted before is written to this process's journal and returns without
  waiting for the ack, while the last ack's ``room`` covers it (``JOURNAL_CREDIT`` at most);
  the handle takes the ack at ``result()``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from . import messages
from .bootstrap import ClientConfig
from .connection import Connection, Future, Reply
from .errors import CapsuleError, ConfigError
from .journal import Journal, Segment
from .lifecycle import current_pid

JOURNAL_CREDIT = 4096  # journaled tasks a process may have unacknowledged: max_queued's leeway
_BATCH_ITEMS = 4096  # tasks per Submit message: its header stays far below the 1 MiB header limit
_BATCH_HEADER_BYTES = 512 * 1024
_ITEM_MAX_BYTES = 64 * 1024

# a submit's header item ([id, name, lock_key, sid, owner, run_at, priority, rate_key]) and payload
Prepared = tuple[list[Any], bytes]


@dataclasses.dataclass
class Submitted:
    """One submitted task as the client knows it once ``submit`` returns."""

    task_id: str  # with ``conflict``: the live task holding the lock key
    deduplicated: bool = False
    conflict: bool = False
    push: Future | None = None  # the reply its outcome is pushed to
    ack: tuple[Future, int] | None = None  # journaled: the ack (and this item's index) to take later


class AppClient(Protocol):
    """What handles, sessions, workflows and ``App`` use of this process's client: a ``Client``
    of a supervisor, or, where no supervisor runs and the store is PostgreSQL, a
    ``store_client.StoreClient`` that answers from the store (``bootstrap.store_only``)."""

    @property
    def closed(self) -> bool: ...

    @property
    def pid(self) -> int: ...

    def request(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Future: ...

    def call(
        self,
        make: Callable[[int], messages.Message],
        frames: list[bytes] | None = None,
        timeout: float | None = None,
        must_run: bool = False,
    ) -> Reply: ...

    async def acall(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Reply: ...

    def wait_reply(self, fut: Future, timeout: float | None, must_run: bool = False) -> Reply: ...

    async def await_reply(self, fut: Future) -> Reply: ...

    def forget(self, fut: Future) -> None: ...

    def discard(self, fut: Future) -> None: ...

    def wait(self, task_id: str) -> Future: ...

    def submit(self, name: str, prepared: list[Prepared]) -> list[Submitted]: ...

    async def asubmit(self, name: str, prepared: list[Prepared]) -> list[Submitted]: ...


class ClientSource(Protocol):
    """What finds this process's client of a supervisor: an App (``App.client()``). Handles and
    sessions hold one, so they travel between processes and find the client there."""

    def client(self) -> AppClient: ...


def wait_request(task_id: str, req: int) -> messages.Message:
    return messages.Wait(req, task_id)


class Client:
    """Submits and requests to one supervisor, for every thread of this process."""

    _shared: dict[tuple[int, ClientConfig], Client] = {}
    _shared_lock = threading.Lock()

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._conn = Connection(config)
        self._journal: Journal | None = None  # made at the first journaled submit
        self._journal_lock = threading.Lock()
        self.room = 0  # how many more tasks max_queued allowed at the last submit's ack
        self.confirmed: set[str] = set()  # task names the supervisor has accepted a submit of

    @classmethod
    def shared(cls, config: ClientConfig) -> Client:
        """This process's client for ``config`` (made at first use; a forked child makes its own)."""
        key = (current_pid(), config)
        client = cls._shared.get(key)
        if client is not None and not client.closed:
            return client
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None or client.closed:
                client = cls._shared[key] = Client(config)
        return client

    @classmethod
    def close_all(cls, state_dir: Path | None = None) -> None:
        """Close this process's clients (of one state directory, or all), store-only ones too."""
        from .store_client import StoreClient

        with cls._shared_lock:
            keys = [k for k in cls._shared if state_dir is None or k[1].state_dir == state_dir]
            clients = [cls._shared.pop(k) for k in keys]
        for client in clients:
            if client.pid == current_pid():
                client.close()
        StoreClient.close_all(state_dir)

    def close(self) -> None:
        self._conn.close()
        if self._journal is not None:  # unanswered records stay: the supervisor replays them
            self._journal.close()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def pid(self) -> int:
        """The process it belongs to (a forked child makes its own)."""
        return self._conn.pid

    @property
    def connected(self) -> bool:
        return self._conn.connected

    def outstanding(self) -> int:
        """Requests (sent or expected) whose reply has not come."""
        return self._conn.outstanding()

    # ---- requests ----------------------------------------------------------------------------
    def request(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Future:
        return self._conn.request(make, frames)

    def call(
        self,
        make: Callable[[int], messages.Message],
        frames: list[bytes] | None = None,
        timeout: float | None = None,
        must_run: bool = False,
    ) -> Reply:
        """Send and wait; the supervisor's error reply is raised as our exception."""
        return self._conn.call(make, frames, timeout, must_run)

    async def acall(self, make: Callable[[int], messages.Message], frames: list[bytes] | None = None) -> Reply:
        return await self._conn.acall(make, frames)

    def wait_reply(self, fut: Future, timeout: float | None, must_run: bool = False) -> Reply:
        return self._conn.wait_reply(fut, timeout, must_run)

    async def await_reply(self, fut: Future) -> Reply:
        return await self._conn.await_reply(fut)

    def forget(self, fut: Future) -> None:
        self._conn.forget(fut)

    def discard(self, fut: Future) -> None:
        self._conn.discard(fut)

    def wait(self, task_id: str) -> Future:
        """Ask for a task's outcome (``Wait``)."""
        return self._conn.request(functools.partial(wait_request, task_id))

    # ---- submits -----------------------------------------------------------------------------
    def submit(self, name: str, prepared: list[Prepared]) -> list[Submitted]:
        """Record the tasks durably; return once they are (in the journal, or acknowledged)."""
        journaled = self._journaled(name, prepared)
        if journaled is not None:
            return journaled
        sent = []
        for batch in batches(prepared):
            pushes = self._pushes(batch)
            sent.append((pushes, self._conn.request(_submit_of(batch, pushes), [p[1] for p in batch])))
        done: list[Submitted] = []
        for k, (pushes, fut) in enumerate(sent):
            try:
                body, _ = self._conn.wait_reply(fut, None, must_run=True)
            except BaseException as exc:  # this batch and the later ones: expect no pushes
                self._failed(exc, [pushes for pushes, _ in sent[k:]], done)
                raise
            done += self._accepted(name, body, pushes)
        return done

    async def asubmit(self, name: str, prepared: list[Prepared]) -> list[Submitted]:
        """``submit`` without blocking the event loop (a journal write does not block it)."""
        journaled = self._journaled(name, prepared)
        if journaled is not None:
            return journaled
        done: list[Submitted] = []
        for batch in batches(prepared):
            pushes = self._pushes(batch)
            try:
                body, _ = await self._conn.acall(_submit_of(batch, pushes), [p[1] for p in batch])
            except BaseException as exc:
                self._failed(exc, [pushes], done)
                raise
            done += self._accepted(name, body, pushes)
        return done

    def _pushes(self, batch: list[Prepared]) -> list[Future]:
        return [self._conn.expect(functools.partial(wait_request, p[0][0])) for p in batch]

    def _accepted(self, name: str, body: Any, pushes: list[Future]) -> list[Submitted]:
        """An ack: ``name`` may be journaled from now on; a task not pushed expects no push."""
        ack = messages.SubmitAck.from_wire(body)
        self.confirmed.add(name)
        self.room = ack.room
        done = []
        for item, push in zip(ack.items, pushes):
            if not item.pushed:
                self._conn.discard(push)
            done.append(Submitted(item.task_id, item.deduplicated, item.conflict, push if item.pushed else None))
        return done

    def _failed(self, exc: BaseException, unanswered: list[list[Future]], done: list[Submitted]) -> None:
        """A Submit failed: expect no pushed outcomes for it (nor for those sent after it); for a
        map() larger than one message, say what was recorded before (``exc.submitted``)."""
        for pushes in unanswered:
            for push in pushes:
                self._conn.discard(push)
        if done and isinstance(exc, CapsuleError):
            exc.add_note(
                f"the first {len(done)} tasks of this map() were recorded before the error; "
                "their handles are on the exception's .handles"
            )
            exc.submitted = done  # type: ignore[attr-defined]

    # ---- the submit journal ------------------------------------------------------------------
    def _journaled(self, name: str, prepared: list[Prepared]) -> list[Submitted] | None:
        """Unlocked tasks on this host: durable in the submit journal, not waiting for the ack;
        None when they must wait for it instead."""
        if any(p[0][2] is not None for p in prepared) or not self._may_journal(name, len(prepared)):
            return None
        if len(prepared) > _BATCH_ITEMS or sum(1 for _ in batches(prepared)) != 1:  # more than one Submit
            return None
        pushes = self._pushes(prepared)
        segment: list[Segment] = []
        try:
            with self._journal_lock:
                journal = self._journal = self._journal or Journal(self.config.state_dir)
            ack = self._conn.request(
                _submit_of(prepared, pushes, True),
                [p[1] for p in prepared],
                record=lambda msg: segment.append(journal.append(msg, len(prepared))),
            )
        except OSError:  # e.g. a full disk: the supervisor's answer will say what is wrong
            for push in pushes:
                self._conn.discard(push)
            return None
        ack.add_done_callback(functools.partial(self._on_journaled_ack, journal, segment[0], len(prepared), pushes))
        return [
            Submitted(item[0], push=push, ack=(ack, i)) for i, ((item, _), push) in enumerate(zip(prepared, pushes))
        ]

    def _may_journal(self, name: str, n: int) -> bool:
        """On this host and connected, ``name`` accepted by the supervisor before (so a code
        mismatch still fails at submit), and room for ``n`` more under max_queued by the last
        ack (so Backpressure still comes at submit)."""
        unacked = self._journal.unacked_items if self._journal is not None else 0
        conn = self._conn
        return (
            self.config.remote is None
            and conn.connected
            and not conn.closed
            and name in self.confirmed
            and unacked + n <= min(self.room, JOURNAL_CREDIT)
        )

    def _on_journaled_ack(self, journal: Journal, segment: Segment, n: int, pushes: list[Future], fut: Future) -> None:
        """On the I/O thread: the supervisor recorded (or refused) a journaled submit."""
        if fut.exception() is not None:
            return  # the connection closed first: the record stays for the supervisor to replay
        (ok, body), _ = fut.result()
        ack = messages.SubmitAck.from_wire(body) if ok else None
        if ack is not None:  # before the unacked count drops: _may_journal (another thread) reads
            self.room = ack.room  # that count first, so it never pairs the new count with the old room
        journal.acked(segment, n)
        for i, push in enumerate(pushes):
            if ack is None or not ack.items[i].pushed:  # refused, or held in the store only
                self._conn.discard(push)


def batches(prepared: list[Prepared]) -> Iterator[list[Prepared]]:
    """Split a map() into Submit messages; each one is recorded atomically by the supervisor."""
    batch: list[Prepared] = []
    size = 0
    for p in prepared:
        cost = item_cost(p[0])
        if batch and (len(batch) >= _BATCH_ITEMS or size + cost > _BATCH_HEADER_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += cost
    if batch:
        yield batch


def item_cost(item: list[Any]) -> int:
    """The bytes an item takes in a Submit header; ConfigError past what one item may take."""
    cost = 16 + sum(len(v) for v in item if isinstance(v, str))
    if cost > _ITEM_MAX_BYTES:
        raise ConfigError(
            f"task {item[1]!r}: its lock key and session id take {cost} bytes; keep them "
            f"under {_ITEM_MAX_BYTES} (they are routing keys, not data: pass data as arguments)"
        )
    return cost


def _submit_of(
    batch: list[Prepared], pushes: list[Future], journaled: bool = False
) -> Callable[[int], messages.Message]:
    items = [p[0] for p in batch]
    push = [fut.req for fut in pushes]  # type: ignore[attr-defined]
    return lambda req: messages.Submit(req, items, push, journaled)
