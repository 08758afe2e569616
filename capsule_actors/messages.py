"""The header schema: small typed records, msgpack-encoded, validated before any payload is touched.

Every ZeroMQ message is ``[header, *payload_frames]``. The header is a msgpack array whose first
item is the operation code; :func:`decode` checks the op, the arity and every field's type and
raises :class:`ProtocolError` otherwise. Payload frames (cloudpickle bytes) are opaque here: the
supervisor never unpickles them, and the processes that do only do so after the header passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, ClassVar, NamedTuple, TypeVar

import msgpack

from .errors import ProtocolError

_NONE = type(None)
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "bytes": (bytes,),
    "list[Any]": (list,),
    "dict[str, Any]": (dict,),
    "Any": (object,),
    "str | None": (str, _NONE),
    "float | None": (int, float, _NONE),
    "int | None": (int, _NONE),
}

# The version of the messages between the supervisor, its actors and its worker nodes, raised
# whenever one of them changes: a node of another version is refused at its hello, instead of
# joining and having its actors' messages dropped as malformed. 1: before held Runs (Started,
# Withdraw, Withdrawn, Run.held, Done.began_next); 2: with them; 3: Run.trace, Run.link and
# Done.trace (OpenTelemetry context). Clients are not versioned by it: a Submit item has 6
# fields (an older client's journal), 8 (priority, rate key) or 9 (and the submitter's
# traceparent), so old clients keep working with a new supervisor.
PROTOCOL = 3

M = TypeVar("M", bound="Message")
_BY_OP: dict[int, type[Message]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """Base of all headers; subclasses are registered with :func:`_message`."""

    OP: ClassVar[int] = -1
    _CHECKS: ClassVar[tuple[tuple[str, tuple[type, ...]], ...]] = ()

    def encode(self) -> bytes:
        fields = (getattr(self, name) for name, _ in self._CHECKS)
        return msgpack.packb([self.OP, *fields], use_bin_type=True)  # type: ignore[no-any-return]

    def check(self) -> None:
        """Deeper validation of container fields; the default has nothing more to check."""


def _message(op: int):  # type: ignore[no-untyped-def]
    def register(cls: type[M]) -> type[M]:
        cls.OP = op
        cls._CHECKS = tuple((f.name, _TYPES[str(f.type)]) for f in dataclasses.fields(cls))
        if op in _BY_OP:
            raise RuntimeError(f"op {op} registered twice")
        _BY_OP[op] = cls
        return cls

    return register


def _items(raw: bytes, max_len: int) -> list[Any]:
    if len(raw) > max_len:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {max_len}")
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise ProtocolError("header must be a msgpack array starting with an int op code")
    return items


def op_code(raw: bytes, max_len: int = 1 << 20) -> int | None:
    """The op code of a header that :func:`decode` refused (say, one from another version)."""
    try:
        return int(_items(raw, max_len)[0])
    except ProtocolError:
        return None


def version_hint() -> str:
    """What to do about a peer whose messages this version cannot read (or that cannot read ours)."""
    from . import __version__

    return (
        f"this supervisor speaks protocol {PROTOCOL} (capsule_actors {__version__}): install the same "
        f"capsule_actors version on every machine that talks to it"
    )


def request_id(raw: bytes, requests: Collection[type[Message]], max_len: int = 1 << 20) -> int | None:
    """The ``req`` of a header that :func:`decode` refused, when it has the op code of one of
    ``requests`` and an int where their ``req`` goes, so the client gets an error instead of
    waiting for an answer that never comes."""
    try:
        items = _items(raw, max_len)
    except ProtocolError:
        return None
    if _BY_OP.get(items[0]) not in requests or len(items) < 2:
        return None
    return items[1] if type(items[1]) is int else None


def decode(raw: bytes, max_len: int = 1 << 20) -> Message:
    """Decode and validate one header; raise ProtocolError naming what is wrong."""
    items = _items(raw, max_len)
    cls = _BY_OP.get(items[0])
    if cls is None:
        raise ProtocolError(f"unknown op code {items[0]!r}")
    values = items[1:]
    if len(values) != len(cls._CHECKS):
        raise ProtocolError(f"{cls.__name__} needs {len(cls._CHECKS)} fields, got {len(values)}")
    for (name, types), value in zip(cls._CHECKS, values):
        if not isinstance(value, types) or (type(value) is bool and int in types and bool not in types):
            raise ProtocolError(f"{cls.__name__}.{name}: bad type {type(value).__name__}")
    msg = cls(*values)
    msg.check()
    return msg


def _check_str_list(owner: str, values: list[Any]) -> None:
    if not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"{owner}: every item must be a string")


# ---- client -> supervisor -------------------------------------------------------------------

SUBMIT_ITEM_TYPES: tuple[tuple[type, ...], ...] = (
    (str,),  # task id (client-made, so a resent submit is idempotent)
    (str,),  # task name
    (str, _NONE),  # lock key
    (str, _NONE),  # session id
    (str, _NONE),  # session owner
    (int, float, _NONE),  # run_at (epoch seconds) or None for now
    (int,),  # priority (higher starts first)
    (str, _NONE),  # rate-limit key (a RateLimit with key=), or None
    (str, _NONE),  # optional 9th: the submitter's W3C traceparent (capsule_actors.tracing)
)
SUBMIT_ITEM_V1 = 6  # items without priority and rate key (journals of an older version): priority 0
SUBMIT_ITEM_V2 = 8  # with priority and rate key; a 9th field, when there, is the trace context


@_message(1)
@dataclasses.dataclass(frozen=True, slots=True)
class Submit(Message):
    """Record these tasks durably, then acknowledge; one payload frame per item follows.

    ``push``: empty, or one request id per item that the client keeps open for the item's
    outcome: the supervisor answers it as if a ``Wait(push[i], id)`` had come with the submit, so
    a result costs no round trip of its own (after a reconnect the client sends that Wait). The
    ack says per item ``[id, deduplicated, conflict, pushed]``: a task held in the store only
    (the backlog, a delayed task) is not pushed, so a deep queue costs no memory; its handle
    asks with ``Wait`` when ``result()`` is called. The ack's body is ``{"items": [those per
    item], "room": how many more tasks max_queued allows now}``.

    ``journaled``: the client wrote this message to its submit journal first and did not wait
    for the ack (``capsule_actors/journal.py``): it is durable already, so it is not refused for
    max_queued (the client only journals while the last ack's ``room`` covers it)."""

    req: int
    items: list[Any]
    push: list[Any]
    journaled: bool

    def check(self) -> None:
        if not self.items:
            raise ProtocolError("Submit.items is empty")
        if self.push and (len(self.push) != len(self.items) or not all(type(r) is int for r in self.push)):
            raise ProtocolError("Submit.push must be empty or one int request id per item")
        for item in self.items:
            if not isinstance(item, list) or len(item) not in (SUBMIT_ITEM_V1, SUBMIT_ITEM_V2, SUBMIT_ITEM_V2 + 1):
                raise ProtocolError(
                    f"Submit item must be a {SUBMIT_ITEM_V2}-item array ({SUBMIT_ITEM_V2 + 1} with a trace context)"
                )
            if len(item) > SUBMIT_ITEM_V2 and item[SUBMIT_ITEM_V2] is not None and len(item[SUBMIT_ITEM_V2]) > 256:
                raise ProtocolError("Submit trace context over 256 characters")
            for value, types in zip(item, SUBMIT_ITEM_TYPES):
                if not isinstance(value, types) or isinstance(value, bool):
                    raise ProtocolError(f"Submit item field has bad type {type(value).__name__}")
            if not (0 < len(item[0]) <= 64):
                raise ProtocolError("Submit task id must be 1..64 characters")


@_message(2)
@dataclasses.dataclass(frozen=True, slots=True)
class Wait(Message):
    """Reply once the task is terminal, with its outcome and result frame."""

    req: int
    task_id: str


@_message(3)
@dataclasses.dataclass(frozen=True, slots=True)
class Forget(Message):
    """Drop a pending Wait/Events request of this client (its waiter gave up)."""

    req: int


@_message(4)
@dataclasses.dataclass(frozen=True, slots=True)
class Info(Message):
    """Reply with the TaskInfo records of these task ids."""

    req: int
    task_ids: list[Any]

    def check(self) -> None:
        _check_str_list("Info.task_ids", self.task_ids)


@_message(5)
@dataclasses.dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Cancel one task; reply True if it was live and is now cancelled."""

    req: int
    task_id: str


@_message(6)
@dataclasses.dataclass(frozen=True, slots=True)
class ListTasks(Message):
    """Reply with task records, newest first, optionally of one state."""

    req: int
    state: str | None
    limit: int


@_message(7)
@dataclasses.dataclass(frozen=True, slots=True)
class Status(Message):
    """Reply with the supervisor's and every actor's status."""

    req: int


@_message(8)
@dataclasses.dataclass(frozen=True, slots=True)
class Events(Message):
    """Reply with the task's events after seq ``after``; held until one exists (long poll)."""

    req: int
    task_id: str
    after: int


@_message(9)
@dataclasses.dataclass(frozen=True, slots=True)
class InjectCrash(Message):
    """Testing aid: make attempt ``attempt`` of task ``name`` kill its actor process."""

    req: int
    name: str
    attempt: int


@_message(10)
@dataclasses.dataclass(frozen=True, slots=True)
class SessionEvents(Message):
    """Reply with the session's events after seq ``after``; held until one exists (long poll)."""

    req: int
    session_id: str
    after: int


@_message(11)
@dataclasses.dataclass(frozen=True, slots=True)
class AllEvents(Message):
    """Reply with every event after seq ``after``; held until one exists (the board's feed)."""

    req: int
    after: int


@_message(12)
@dataclasses.dataclass(frozen=True, slots=True)
class Retry(Message):
    """Submit a finished task again with the same arguments and session; reply with the new id."""

    req: int
    task_id: str


SESSION_KV_OPS = ("get", "set", "del", "items", "cas")


@_message(13)
@dataclasses.dataclass(frozen=True, slots=True)
class SessionKV(Message):
    """One ``session.db`` operation for a task on a worker node (values are JSON text).

    ``get`` -> text or None; ``set`` -> True; ``del`` -> existed; ``items`` -> [[key, text]];
    ``cas`` -> whether ``key`` held ``expected`` (None: absent) and now holds ``value``."""

    req: int
    session_id: str
    op: str
    key: str
    value: str | None
    expected: str | None

    def check(self) -> None:
        if self.op not in SESSION_KV_OPS:
            raise ProtocolError(f"SessionKV.op {self.op!r} not one of {SESSION_KV_OPS}")
        if not self.session_id or (self.op != "items" and not self.key):
            raise ProtocolError("SessionKV needs a session id and (but for items) a key")
        if self.op in ("set", "cas") and self.value is None:
            raise ProtocolError(f"SessionKV {self.op} needs a value")


@_message(14)
@dataclasses.dataclass(frozen=True, slots=True)
class ShowCard(Message):
    """``session.show_task(h)`` from app code: the session follows task ``task_id``'s card (a
    ``card`` event now, and one at each later state change); reply True (UnknownTask: no such task)."""

    req: int
    session_id: str
    task_id: str

    def check(self) -> None:
        if not self.session_id or not self.task_id:
            raise ProtocolError("ShowCard needs a session id and a task id")


@_message(20)
@dataclasses.dataclass(frozen=True, slots=True)
class Reply(Message):
    """Supervisor -> client answer to request ``req``; frames may follow."""

    req: int
    ok: bool
    body: Any


# ---- typed answers: what some Reply bodies hold ---------------------------------------------
# On the wire they stay plain msgpack (arrays and maps, as the CLI's --json prints them); these
# records are what both ends build and read, so no answer is unpacked by position anywhere else.


def _load(cls: type[R], data: Any) -> R:
    """A record from its wire dict, each field type-checked (ProtocolError otherwise)."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in data:
            raise ProtocolError(f"{cls.__name__}: missing {field.name}")
        value = data[field.name]
        if not isinstance(value, _TYPES[str(field.type)]):
            raise ProtocolError(f"{cls.__name__}.{field.name}: bad type {type(value).__name__}")
        values[field.name] = value
    return cls(**values)


R = TypeVar("R")


class AckItem(NamedTuple):
    """One submitted task as the supervisor decided it (a tuple: on the wire as it is)."""

    task_id: str  # the task's id, or with ``conflict`` the live task holding its lock key
    deduplicated: bool  # joined a live task of the same lock key (on_conflict="join")
    conflict: bool  # refused: the key is held (on_conflict="reject")
    pushed: bool  # its outcome comes as the reply to the submit's push request


@dataclasses.dataclass(frozen=True, slots=True)
class SubmitAck:
    """The answer to a Submit: one item per task, and how many more tasks max_queued allows."""

    items: list[AckItem]
    room: int

    def to_wire(self) -> dict[str, Any]:
        return {"items": self.items, "room": self.room}  # msgpack writes each item as an array

    @classmethod
    def from_wire(cls, body: Any) -> SubmitAck:
        try:
            return cls([AckItem(*item) for item in body["items"]], int(body["room"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed submit ack: {exc!r}") from None

    @staticmethod
    def item_of(body: Any, i: int) -> AckItem:
        """Item ``i`` alone (a journaled handle takes its own item of a large ack)."""
        try:
            return AckItem(*body["items"][i])
        except (KeyError, IndexError, TypeError) as exc:
            raise ProtocolError(f"malformed submit ack: {exc!r}") from None


class Outcome(NamedTuple):
    """How a task ended (a Wait's answer; its result or pickled exception is the reply's frame)."""

    state: str
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None

    def to_wire(self) -> tuple[Any, ...]:
        return tuple(self)

    @classmethod
    def from_wire(cls, body: Any) -> Outcome:
        if not isinstance(body, list) or len(body) != 4 or not isinstance(body[0], str):
            raise ProtocolError(f"malformed outcome: {body!r:.200}")
        return cls(*body)


@dataclasses.dataclass(frozen=True, slots=True)
class SupervisorStatus:
    pid: int
    state: str  # running | stopping
    started_at: float
    state_dir: str
    rss: int
    endpoint: str
    live_tasks: int  # queued, scheduled or running, in memory or in the backlog
    in_memory: int
    backlog: int
    store_bytes: int  # the task store's file
    wal_bytes: int  # its write-ahead log (bounded: checkpointed and cut back while running)
    free_bytes: int  # free space on the store's file system
    store_full: bool  # too little of it: new tasks are refused (StoreFull) until there is more


@dataclasses.dataclass(frozen=True, slots=True)
class ActorStatus:
    slot: str
    role: str
    node: str | None
    pid: int | None
    state: str  # ready | starting | stopping | restarting | down
    restarts: int
    rss: int | None
    running: int
    held: int  # a process actor's Runs sent but not begun
    tasks_done: int
    last_exit: str | None
    keys: int  # live lock keys it owns


@dataclasses.dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    host: str
    pid: int
    state: str  # connected | leaving
    joined_at: float
    last_seen_ago: float
    slots: list[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """``capsule-actors status``: the supervisor, every actor slot, worker nodes, tasks per state."""

    supervisor: SupervisorStatus
    actors: list[ActorStatus]
    nodes: list[NodeStatus]
    tasks: dict[str, int]
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # a cluster's, newest first
    member: dict[str, Any] | None = None  # the cluster member that answered: id (incarnation), name

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, body: Any) -> StatusSnapshot:
        if not isinstance(body, dict) or not isinstance(body.get("actors"), list):
            raise ProtocolError("malformed status snapshot")
        return cls(
            _load(SupervisorStatus, body.get("supervisor")),
            [_load(ActorStatus, a) for a in body["actors"]],
            [_load(NodeStatus, n) for n in body.get("nodes") or []],
            {str(k): int(v) for k, v in (body.get("tasks") or {}).items()},
            [dict(m) for m in body.get("members") or [] if isinstance(m, dict)],
            body.get("member") if isinstance(body.get("member"), dict) else None,
        )


# ---- actor <-> supervisor -------------------------------------------------------------------


@_message(40)
@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Message):
    """A freshly started actor announces itself."""

    slot: str
    gen: int
    pid: int
    role: str


@_message(41)
@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The supervisor's answer to Hello; the registry frame (cloudpickled App) follows."""

    config: dict[str, Any]


@_message(42)
@dataclasses.dataclass(frozen=True, slots=True)
class Run(Message):
    """Run one attempt of a task; its argument payload frame follows."""

    task_id: str
    attempt: int
    name: str
    session_id: str | None
    session_owner: str | None
    timeout: float | None
    crash: bool
    held: bool  # a process actor runs another one first: it says Started when this one begins
    trace: str | None = None  # the submitter's W3C traceparent: the attempt's span is its child
    link: str | None = None  # the previous attempt's span (traceparent), linked from this one


@_message(43)
@dataclasses.dataclass(frozen=True, slots=True)
class CancelRun(Message):
    """Cancel the running attempt of a task."""

    task_id: str
    attempt: int


@_message(44)
@dataclasses.dataclass(frozen=True, slots=True)
class Done(Message):
    """An attempt ended; a result or pickled-exception frame follows (may be empty)."""

    task_id: str
    attempt: int
    outcome: str  # one of OUTCOMES
    error_type: str
    error_message: str
    traceback: str
    retryable: bool
    began_next: str = ""  # a process actor: the held Run it begins now ("" if none)
    trace: str | None = None  # the attempt's own span (traceparent), for the next attempt's link

    def check(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ProtocolError(f"Done.outcome {self.outcome!r} not one of {OUTCOMES}")


OUTCOMES = ("ok", "error", "cancelled", "timeout")


@_message(56)
@dataclasses.dataclass(frozen=True, slots=True)
class Started(Message):
    """A process actor began a held Run (one sent while it ran another) that no Done announced
    as ``began_next``: the supervisor then knows which attempt a crash, cancel or timeout hits."""

    task_id: str
    attempt: int


@_message(57)
@dataclasses.dataclass(frozen=True, slots=True)
class Withdraw(Message):
    """Supervisor -> process actor: give back this held Run if it has not begun (another
    process actor is idle); answered by Withdrawn, or by the Done/Started that says it began."""

    task_id: str
    attempt: int


@_message(58)
@dataclasses.dataclass(frozen=True, slots=True)
class Withdrawn(Message):
    """A process actor gave back a held Run it had not begun: it will not run it."""

    task_id: str
    attempt: int


@_message(45)
@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Actor liveness, with the number of attempts it is running."""

    running: int


@_message(46)
@dataclasses.dataclass(frozen=True, slots=True)
class Stop(Message):
    """Finish running attempts within ``grace`` seconds, then exit."""

    grace: float


@_message(47)
@dataclasses.dataclass(frozen=True, slots=True)
class Admit(Message):
    """Supervisor -> owner actor: decide these submits of locked tasks, ``[task_id, key, policy]``."""

    items: list[Any]

    def check(self) -> None:
        for item in self.items:
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, str) for v in item)):
                raise ProtocolError("Admit item must be [task_id, key, policy] strings")


@_message(48)
@dataclasses.dataclass(frozen=True, slots=True)
class Admitted(Message):
    """Owner actor -> supervisor: ``[task_id, verdict, holder_id]`` per Admit item."""

    decisions: list[Any]

    def check(self) -> None:
        for item in self.decisions:
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, str) for v in item)):
                raise ProtocolError("Admitted item must be [task_id, verdict, holder] strings")
            if item[1] not in ("run", "queue", "join", "reject"):
                raise ProtocolError(f"unknown verdict {item[1]!r}")


@_message(49)
@dataclasses.dataclass(frozen=True, slots=True)
class Release(Message):
    """Supervisor -> owner actor: this task ended; free its key (or drop it from the queue)."""

    task_id: str
    key: str


@_message(50)
@dataclasses.dataclass(frozen=True, slots=True)
class Promote(Message):
    """Owner actor -> supervisor: these tasks now hold their keys and may run."""

    task_ids: list[Any]

    def check(self) -> None:
        _check_str_list("Promote.task_ids", self.task_ids)


EVENT_KINDS = ("reply", "notify", "stream", "progress", "card")  # what a session can emit


@_message(51)
@dataclasses.dataclass(frozen=True, slots=True)
class Emit(Message):
    """Actor -> supervisor: a running attempt's session event (reply, notify, stream, progress, card)."""

    task_id: str
    attempt: int
    kind: str
    data: dict[str, Any]

    def check(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ProtocolError(f"Emit.kind {self.kind!r} not one of {EVENT_KINDS}")


@_message(52)
@dataclasses.dataclass(frozen=True, slots=True)
class Fire(Message):
    """Clock -> supervisor: schedule ``name`` reached its slot (epoch seconds); submit one task."""

    name: str
    slot: float


@_message(53)
@dataclasses.dataclass(frozen=True, slots=True)
class Due(Message):
    """Clock -> supervisor: these scheduled tasks (``.schedule(delay=/at=)``) are due now."""

    task_ids: list[Any]

    def check(self) -> None:
        _check_str_list("Due.task_ids", self.task_ids)


@_message(54)
@dataclasses.dataclass(frozen=True, slots=True)
class Wake(Message):
    """Supervisor -> clock: a scheduled task was recorded; look again at what is due next."""

    reason: str


@_message(55)
@dataclasses.dataclass(frozen=True, slots=True)
class Rekey(Message):
    """Supervisor -> owner actor: the pool changed (a node joined or left); rebuild the key table
    from these ``[key, [holder, *queued]]`` rows, read from the store, and promote the holders."""

    keys: list[Any]

    def check(self) -> None:
        for row in self.keys:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], list)):
                raise ProtocolError("Rekey row must be [key, [task ids]]")
            _check_str_list("Rekey task ids", row[1])


# ---- worker node <-> supervisor (over TCP + CURVE) ------------------------------------------


@_message(60)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeHello(Message):
    """A worker node (a new incarnation of it) asks to join with these actor slots."""

    name: str
    app: str
    tasks: list[Any]
    workers: int
    process_workers: int
    host: str
    pid: int
    protocol: int  # PROTOCOL of the node's capsule_actors

    def check(self) -> None:
        _check_str_list("NodeHello.tasks", self.tasks)


@_message(61)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeWelcome(Message):
    """Supervisor -> node: joined; ``config`` has the lease and ping intervals and the slot names."""

    config: dict[str, Any]


@_message(62)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeRefused(Message):
    """Supervisor -> node: ``fatal`` (bad app, name taken: exit) or not (unknown incarnation, e.g.
    after a supervisor restart: fence the actors and say hello again)."""

    reason: str
    fatal: bool


@_message(63)
@dataclasses.dataclass(frozen=True, slots=True)
class NodePing(Message):
    """Node -> supervisor, every ping interval: liveness, and the RSS of each of its actors."""

    seq: int
    rss: dict[str, Any]


@_message(64)
@dataclasses.dataclass(frozen=True, slots=True)
class Lease(Message):
    """Supervisor -> node: ping ``seq`` arrived; the node's actors may run until its send time
    plus the lease."""

    seq: int


@_message(65)
@dataclasses.dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Supervisor -> node: fork incarnation ``gen`` of actor ``slot`` from the node's template."""

    slot: str
    gen: int
    role: str


@_message(66)
@dataclasses.dataclass(frozen=True, slots=True)
class Spawned(Message):
    """Node -> supervisor: the actor forked, with this pid (on the node's host)."""

    slot: str
    gen: int
    pid: int


@_message(67)
@dataclasses.dataclass(frozen=True, slots=True)
class Kill(Message):
    """Supervisor -> node: send ``signal`` to incarnation ``gen`` of ``slot``."""

    slot: str
    gen: int
    signal: int


@_message(68)
@dataclasses.dataclass(frozen=True, slots=True)
class Exited(Message):
    """Node -> supervisor: an actor exited (``code`` < 0: killed by that signal)."""

    slot: str
    gen: int
    code: int


@_message(69)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeBye(Message):
    """Node -> supervisor: the node is stopping; stop its actors gracefully and forget it."""

    grace: float
