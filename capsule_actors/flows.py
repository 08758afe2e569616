"""Workflows on the app side: signatures (``task.s(...)``), ``chain``, ``group``, ``chord``, and
the ``FlowHandle`` a submitted workflow returns.

A workflow is submitted as one ``Submit`` (so one transaction): its first steps as plain queued
tasks, every other step as a task *waiting* for its inputs (SCHEDULED without a ``run_at``, its
arguments an envelope the supervisor can read: ``envelope``), and one more task, the *flow
record* (``capsule.flow``), which waits for every step and ends with the workflow's outcome. The
supervisor (``supervisor/flows.py``) releases a waiting step in the transaction that records the
outcome releasing it; the released step's arguments are a pickle that, once unpickled in the
actor, puts the inputs' results in front of the step's own arguments (``FlowArgs``). The
supervisor never unpickles anything: it only wraps result bytes it holds.

A step whose task has a ``lock`` is always recorded waiting (even a first step), with its key in
the envelope: once released, it goes through its key's owner like a submit of that task
(``on_conflict`` run/queue/join/reject; ``supervisor/flows.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import cloudpickle
import msgpack

from .client import batches, item_cost
from .errors import ConfigError, ProtocolError, UnknownTask
from .handle import TaskEventStream, TaskHandle
from .ids import new_task_id
from .states import QUEUED, RUNNING, SCHEDULED, TaskState

if TYPE_CHECKING:
    from .app import App, Task
    from .session import Session

FLOW_TASK = "capsule.flow"  # the flow record's task name (never run by an actor)
WAITING = -1.0  # a Submit item's run_at for a step waiting for its inputs (recorded SCHEDULED, no run_at)
MAGIC = b"\x00cpsl-flow1"  # a waiting step's arguments: MAGIC + msgpack envelope (a pickle starts with 0x80)
MAX_STEPS = 4_000  # one Submit message, so that the whole workflow is one transaction

Spec: TypeAlias = str | list["Spec"]  # where a value comes from: a step id, or a list of those (a group)


# ---- what the supervisor reads, and what the actor unpickles --------------------------------
def envelope(
    kind: str,
    inputs: Spec | None,
    deps: list[str],
    args: bytes | None,
    handler: str | None = None,
    key: str | None = None,
) -> bytes:
    """A waiting step's arguments: ``kind`` is "step", "error" (on_error), "flow" (the record,
    whose ``handler`` is the on_error step, if any) or "join" (a locked step that joined the
    task holding its key: ``inputs`` and ``deps`` name that task, ``args`` are the step's released
    arguments). ``key`` is a locked step's lock key, formatted at submit: the row's own lock key
    stays NULL until the key's owner admits the step (a waiting step holds no key)."""
    env = {"k": kind, "in": inputs, "deps": deps, "a": args, "h": handler, "l": key}
    return MAGIC + bytes(msgpack.packb(env, use_bin_type=True))


def read_envelope(data: bytes) -> dict[str, Any]:
    """The envelope of a waiting step, checked field by field (the supervisor reads it)."""
    if not data.startswith(MAGIC):
        raise ProtocolError("not a workflow step's envelope")
    try:
        env = msgpack.unpackb(data[len(MAGIC) :], raw=False)
    except Exception as exc:
        raise ProtocolError(f"a workflow envelope does not decode: {exc}") from None
    if (
        not isinstance(env, dict)
        or env.get("k") not in ("step", "error", "flow", "join")
        or not isinstance(env.get("deps"), list)
        or not all(isinstance(d, str) for d in env["deps"])
        or not isinstance(env.get("a"), (bytes, type(None)))
        or not isinstance(env.get("l"), (str, type(None)))
    ):
        raise ProtocolError("a workflow envelope has bad fields")
    return env


def resolve(spec: Spec, values: dict[str, Any]) -> Any:
    return values[spec] if isinstance(spec, str) else [resolve(s, values) for s in spec]


def build_args(
    template: bytes, spec: Spec | None, results: dict[str, bytes], extra: tuple[Any, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run by the actor's unpickling of a released step's arguments: (args, kwargs) with the
    inputs' results (and ``extra``) first."""
    args, kwargs = cloudpickle.loads(template)
    if spec is None:
        return (*extra, *args), kwargs
    values = {step: cloudpickle.loads(frame) for step, frame in results.items()}
    return (*extra, resolve(spec, values), *args), kwargs


def build_value(spec: Spec, results: dict[str, bytes]) -> Any:
    """Run by the client's unpickling of the flow record's result: the workflow's value."""
    return resolve(spec, {step: cloudpickle.loads(frame) for step, frame in results.items()})


class FlowArgs:
    """Pickled by the supervisor as a call of ``build_args``: it only wraps bytes."""

    def __init__(self, template: bytes, spec: Spec | None, results: dict[str, bytes], extra: tuple[Any, ...]) -> None:
        self.parts = (template, spec, results, extra)

    def __reduce__(self) -> tuple[Any, ...]:
        return build_args, self.parts


class FlowValue:
    """Pickled by the supervisor as a call of ``build_value`` (the flow record's result)."""

    def __init__(self, spec: Spec, results: dict[str, bytes]) -> None:
        self.parts = (spec, results)

    def __reduce__(self) -> tuple[Any, ...]:
        return build_value, self.parts


def flow_record(*_: Any) -> None:
    """The flow record's task (``FLOW_TASK``): the supervisor ends it, no actor runs it."""


# ---- building a workflow ---------------------------------------------------------------------
class _Flow:
    """What a signature, chain, group and chord share: ``submit`` and ``asubmit``."""

    on_error: Signature | None = None  # a Chain's own, given to chain()

    def submit(self, session: Session | None = None) -> FlowHandle:
        """Record the whole workflow (one transaction) and return its handle."""
        app, items, handle = _compile(cast("Node", self), session)
        app.client().submit(FLOW_TASK, items)
        return handle

    async def asubmit(self, session: Session | None = None) -> FlowHandle:
        """submit() without blocking the event loop."""
        app, items, handle = _compile(cast("Node", self), session)
        await app.client().asubmit(FLOW_TASK, items)
        return handle


class Signature(_Flow):
    """One call of a task, not submitted yet: ``task.s(*args, **kwargs)``, or
    ``task.options(priority=…, session=…).s(...)`` for that step's own priority or session."""

    def __init__(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None = None,
        session: Session | None = None,
    ) -> None:
        self.task, self.args, self.kwargs = task, args, kwargs
        self.priority, self.session = priority, session

    def __repr__(self) -> str:
        return f"<Signature {self.task.name}{self.args!r}>"


class Chain(_Flow):
    """Steps one after the other, each given the previous one's result as its first argument."""

    def __init__(self, steps: list[Node], on_error: Signature | None) -> None:
        self.steps, self.on_error = steps, on_error


class Group(_Flow):
    """Members run in parallel; the group's value is the list of their results, in order."""

    def __init__(self, members: list[Node]) -> None:
        self.members = members


Node: TypeAlias = Signature | Chain | Group


def chain(*steps: Node, on_error: Signature | None = None) -> Chain:
    """``chain(a.s(1), b.s(), c.s())``; ``on_error=h.s()`` runs ``h(step_id, error, ...)`` once
    if a step fails for good."""
    if not steps:
        raise ConfigError("chain() needs at least one step")
    for step in steps:
        _check_node(step, "chain step")
    if on_error is not None and not isinstance(on_error, Signature):
        raise ConfigError(f"on_error={on_error!r}: expected a signature, task.s(...)")
    return Chain(list(steps), on_error)


def group(members: Iterable[Node]) -> Group:
    """``group([a.s(i) for i in range(100)])``: run in parallel."""
    members = list(members)
    if not members:
        raise ConfigError("group([]) is empty: a group needs at least one member")
    for member in members:
        _check_node(member, "group member")
    return Group(members)


def chord(header: Group | Iterable[Node], callback: Signature | None = None) -> Chain:
    """``chord(group, callback.s())``: the callback gets the list of the group's results."""
    if callback is None:
        raise ConfigError("chord() without a callback: pass chord(group, callback.s())")
    if not isinstance(callback, Signature):
        raise ConfigError(f"chord callback {callback!r}: expected a signature, task.s(...)")
    return chain(header if isinstance(header, Group) else group(header), callback)


def _check_node(node: Any, what: str) -> None:
    if not isinstance(node, (Signature, Chain, Group)):
        raise ConfigError(f"{what} {node!r}: expected a signature (task.s(...)), chain, group or chord")
    if isinstance(node, Chain) and node.on_error is not None:
        raise ConfigError("on_error is taken on the outermost chain only")


class _Compiler:
    """Turns a workflow into Submit items: each step with the spec of its inputs.

    A step whose task has a ``lock`` is recorded waiting even with no inputs, its key (formatted
    here, from its own arguments) in its envelope, not in its row: the supervisor sends it to the
    key's owner for admission when it is released (``supervisor/flows.py``), as a submit of that
    task then. So a key may not name the input a step is given (``ConfigError``): that value
    exists only as the previous step's pickled result, which the supervisor never unpickles."""

    def __init__(self, app: App, session: Session | None) -> None:
        self.app, self.session = app, session
        self.items: list[tuple[list[Any], bytes]] = []
        self.steps: list[str] = []

    def node(self, node: Node, inputs: Spec | None) -> Spec:
        if isinstance(node, Signature):
            return self.step(node, inputs)
        if isinstance(node, Group):
            return [self.node(member, inputs) for member in node.members]
        for step in node.steps:
            inputs = self.node(step, inputs)
        assert inputs is not None
        return inputs

    def step(self, sig: Signature, inputs: Spec | None, extra: tuple[Any, ...] = ()) -> str:
        injected = (*extra, *(() if inputs is None else (None,)))
        task = self.check(sig, injected)
        item, args = task.prepare(sig.args, sig.kwargs, sig.session or self.session, None, sig.priority, injected)
        key = item[2]
        if inputs is not None or extra or key is not None:
            item_cost(item)  # with its key, as a submit of the task would be checked
            deps = _flat(inputs) if inputs is not None else []
            item[2], item[5] = None, WAITING
            args = envelope("error" if extra else "step", inputs, deps, args, key=key)
        self.items.append((item, args))
        self.steps.append(item[0])
        return str(item[0])

    def check(self, sig: Signature, injected: tuple[Any, ...]) -> Task[Any, Any]:
        task = sig.task
        if self.app.tasks.get(task.name) is not task:
            raise ConfigError(f"signature of task {task.name!r}, which app {self.app.name!r} does not have")
        params = [p for name, p in task.signature.parameters.items() if name != "session"]
        try:
            task.signature.replace(parameters=params).bind(*injected, *sig.args, **sig.kwargs)
        except TypeError as exc:
            given = f"{len(injected)} input(s) first, then " if injected else ""
            raise ConfigError(
                f"task {task.name!r}: {given}arguments {sig.args!r} {sig.kwargs!r} do not fit: {exc}"
            ) from None
        taken = _injected_into(params, len(injected))
        for what, (template, fields) in task.key_parameters().items():
            for field in fields:
                if field in taken:
                    raise ConfigError(
                        f"workflow step {task.name!r}: its {what} template {template!r} names {{{field}}}, "
                        "the input the step is given, known only when the step before it ends; a step's "
                        "keys are formatted at submit from its own arguments: name another parameter"
                    )
        return task


def _injected_into(params: list[inspect.Parameter], count: int) -> set[str]:
    """The parameters that the first ``count`` positional values bind to."""
    taken: set[str] = set()
    for p in params:
        if len(taken) >= count:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            taken.add(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            taken.add(p.name)
            break
    return taken


def _flat(spec: Spec) -> list[str]:
    return [spec] if isinstance(spec, str) else [s for part in spec for s in _flat(part)]


def _compile(root: Node, session: Session | None) -> tuple[App, list[tuple[list[Any], bytes]], FlowHandle]:
    """The Submit items of a workflow (its steps, then its record), and the handle it will have."""
    app = _app_of(root)
    compiler = _Compiler(app, session)
    out = compiler.node(root, None)
    steps, handler, on_error = list(compiler.steps), None, root.on_error
    if on_error is not None:
        handler = compiler.step(on_error, None, extra=("step id", "error"))
        compiler.items[-1] = (compiler.items[-1][0], _with_deps(compiler.items[-1][1], steps))
    flow_id = new_task_id()
    sid = (session.id, session.owner) if session is not None else (None, None)
    record = [flow_id, FLOW_TASK, None, *sid, WAITING, 0, None]
    compiler.items.append((record, envelope("flow", out, steps, None, handler)))
    if len(compiler.items) > MAX_STEPS or len(list(batches(compiler.items))) > 1:
        raise ConfigError(
            f"a workflow of {len(compiler.items)} steps does not fit one Submit (at most {MAX_STEPS} steps, "
            "512 KiB of lock keys and session ids): it would not be recorded in one transaction"
        )
    return app, compiler.items, FlowHandle(app, flow_id, compiler.steps)


def _with_deps(data: bytes, deps: list[str]) -> bytes:
    env = read_envelope(data)
    return envelope(env["k"], env["in"], deps, env["a"], key=env.get("l"))


def _app_of(node: Node) -> App:
    while not isinstance(node, Signature):
        node = node.steps[0] if isinstance(node, Chain) else node.members[0]
    return node.task.app


# ---- the handle --------------------------------------------------------------------------------
class FlowHandle:
    """A submitted workflow: its value, state, steps and events; ``cancel()`` ends every step
    not finished yet."""

    def __init__(self, app: App, flow_id: str, steps: list[str]) -> None:
        self.id = flow_id
        self._app = app
        self._record = TaskHandle(app, flow_id, FLOW_TASK)
        self._steps = steps

    def __repr__(self) -> str:
        return f"<FlowHandle {self.id} steps={len(self._steps)}>"

    @classmethod
    def from_id(cls, app: App, flow_id: str) -> FlowHandle:
        """Re-attach to a workflow from any process (its steps are named by its first event)."""
        record = TaskHandle.from_id(app, flow_id)
        if record.name != FLOW_TASK:
            raise UnknownTask(f"{flow_id!r} is task {record.name!r}, not a workflow")
        for event in TaskEventStream(record, 0):
            if event.kind == "flow":
                handler = event.data.get("on_error")
                return cls(app, record.id, list(event.data["steps"]) + ([handler] if handler else []))
        raise UnknownTask(f"workflow {flow_id!r} has no record of its steps")

    def result(self, timeout: float | None = None) -> Any:
        """The last step's result (a list for a group); a failed step's error, raised."""
        return self._record.result(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._record.__await__()

    def status(self) -> TaskState:
        """RUNNING while any step is left, else how the workflow ended."""
        state = self._record.status()
        return RUNNING if state in (QUEUED, SCHEDULED) else state

    def done(self) -> bool:
        return self._record.done()

    def cancel(self) -> bool:
        """Cancel every step not finished yet; False when the workflow had ended."""
        return self._record.cancel()

    def steps(self) -> list[TaskHandle]:
        """Each step's handle, in the order they were declared (an on_error handler last)."""
        infos = [TaskHandle(self._app, step, "").info() for step in self._steps]
        return [TaskHandle(self._app, info.id, info.name) for info in infos]

    def events(self, after: int = 0) -> TaskEventStream:
        """The workflow's own events (its steps, each step's end, its end)."""
        return self._record.events(after)
