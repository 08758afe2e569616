"""FlowSteps: the supervisor's side of workflows (``capsule_actors/flows.py`` builds them).

A workflow arrives as one Submit: its first steps queued, every other step *waiting* (SCHEDULED
without a ``run_at``, its arguments an envelope naming its inputs), and the flow record
(``capsule.flow``), which waits for every step. When a task that someone waits on ends
(``Attempts.finish`` asks ``watched``: one dict lookup for any task), ``ended`` releases the
steps whose inputs are all in, in the same turn and so in the same commit as that outcome:
exactly once, since a released step is no longer SCHEDULED, in memory nor in the store. A step
that fails for good ends the flow record with its error; the record's end (failed, cancelled)
cancels every step not finished; the on_error step is released by the first failure. After a
crash ``recover`` rebuilds the waiting steps from the store and applies the outcomes already
there. Nothing is unpickled here: a released step's arguments wrap the result bytes
(``flows.FlowArgs``), which the actor unpickles.

Locked steps. A step whose task has a ``lock`` waits holding no key (its row's lock key is NULL;
the key, formatted at submit, is in its envelope), and is recorded waiting even with no inputs
(``release_ready`` releases those once their Submit is recorded). Released, it is *submitted to
its key's owner* (``KeyRouting.admit``, an ``Admission``) and stays a waiting row meanwhile: a
crash before the decision is recorded releases it again at ``recover``. The decision, in one
turn: run or queue -- the row gets its key, its arguments and a new place in submit order
(``TaskStore.lock_step``) and is queued as an admitted locked task (``Intake.hold_step``); join
-- it becomes a waiting row of kind "join" on the holder, and ends with the holder's outcome
(its result, or its error), which releases what follows it as its own end would; reject -- it
ends FAILED with ``LockConflict`` naming the key and the holder, and the workflow with it. A
step that ends while its owner decides (a cancel) gives the key back if it was granted.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from ..flows import FlowArgs, FlowValue, Spec, envelope, read_envelope
from ..states import CANCELLED, FAILED, RUNNING, SUCCEEDED, TaskState

if TYPE_CHECKING:
    from ..store import Error, StoredTask, TaskStore
    from .keys import KeyRouting
    from .tasks import LiveTask, TaskTable

log = logging.getLogger("capsule_actors.supervisor")


@dataclasses.dataclass(eq=False)
class Waiting:
    """A step, on_error handler or flow record waiting for its inputs."""

    id: str
    kind: str  # "step" | "error" | "flow"
    spec: Spec | None  # a step's inputs, a record's value (step ids)
    deps: list[str]
    session_id: str | None
    remaining: set[str]
    key: str | None = None  # a locked step's lock key: its owner admits it once released


@dataclasses.dataclass(eq=False)
class Admission:
    """A released locked step whose key's owner is deciding (``KeyRouting.admit``'s context)."""

    step: Waiting
    args: bytes  # its released arguments, recorded once it is admitted


class FlowSteps:
    """Owns the waiting steps in memory and who waits for which task (``watched``)."""

    def __init__(self, store: TaskStore, tasks: TaskTable, keys: KeyRouting, max_payload_bytes: int) -> None:
        self._max_payload = max_payload_bytes  # a released step's arguments (its inputs) must fit a Run
        self._store = store
        self._tasks = tasks
        self._keys = keys
        self.watched: dict[str, list[str]] = {}  # task id -> the waiting ones that depend on it
        self._waiting: dict[str, Waiting] = {}
        self._admitting: dict[str, Admission] = {}  # released locked steps, by id, until their owner decides
        self._ready: list[str] = []  # locked steps with no inputs, recorded: release_ready() releases them
        self._ends: collections.deque[tuple[str, TaskState, bytes, Error | None]] = collections.deque()
        self._draining = False
        self._replaying = False  # recover(): outcomes seen before the restart are not new events
        # bound once Intake and Attempts exist (they are built after, and are given ``watched``/``add``)
        self._make_due: Callable[[str], None] = _unbound
        self._load: Callable[[str], LiveTask | None] = _unbound
        self._finish: Callable[[LiveTask, TaskState, bytes, Error | None], None] = _unbound
        self._abandon: Callable[[LiveTask], None] = _unbound
        self._hold: Callable[[str, str, bool], None] = _unbound

    def bind(
        self,
        make_due: Callable[[str], None],
        load: Callable[[str], LiveTask | None],
        finish: Callable[[LiveTask, TaskState, bytes, Error | None], None],
        abandon: Callable[[LiveTask], None],
        hold: Callable[[str, str, bool], None],
        ask_elsewhere: Callable[[StoredTask, str, Admission], bool] | None = None,
    ) -> None:
        self._make_due, self._load, self._finish, self._abandon = make_due, load, finish, abandon
        self._hold = hold
        self._ask_elsewhere = ask_elsewhere  # a cluster member: a key whose shard another member holds

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, task_id: str) -> bool:
        """A waiting step (not an input someone waits for)."""
        return task_id in self._waiting

    # ---- recording ---------------------------------------------------------------------------
    def add(self, task_id: str, session_id: str | None, args: bytes, new: bool = True) -> None:
        """A waiting step was recorded (``new``), or found in the store at start."""
        try:
            env = read_envelope(args)
        except ProtocolError as exc:
            log.error("workflow step %s cannot be read (%s): it stays SCHEDULED; cancel it", task_id, exc)
            return
        deps = list(env["deps"])
        self._waiting[task_id] = Waiting(task_id, env["k"], env["in"], deps, session_id, set(deps), env.get("l"))
        self.watched.setdefault(task_id, [])
        for dep in deps:
            self.watched.setdefault(dep, []).append(task_id)
        if not deps and env["k"] == "step":  # a locked step with no inputs: admitted once all is recorded
            self._ready.append(task_id)
        if new and env["k"] == "flow":  # its steps and their inputs: FlowHandle.from_id, `capsule-actors flow`
            inputs = {step: self._waiting[step].spec for step in deps if step in self._waiting}
            data = {"steps": deps, "inputs": inputs, "on_error": env.get("h"), "value": env["in"]}
            self._store.add_event(task_id, session_id, "flow", data)

    def recover(self) -> None:
        """At start: the waiting steps from the store, then the outcomes they missed (a step
        whose inputs ended while the supervisor was down, or that recovery just failed)."""
        for task_id, session_id, args in self._store.flow_waiting():
            if task_id not in self._waiting:  # (a cluster member adopting a lost member's steps)
                self.add(task_id, session_id, args, new=False)
        self._replaying = True
        try:
            for dep in [d for d in self.watched if d not in self._waiting]:
                outcome = self._store.outcome(dep)
                if outcome is not None and outcome[0] in (SUCCEEDED, FAILED, CANCELLED):
                    state, result, (etype, emsg, trace) = outcome
                    error = None if state == SUCCEEDED else (etype or "TaskFailed", emsg or "", trace or "")
                    self.ended(dep, TaskState(state), result or b"", error)
        finally:
            self._replaying = False
        self.release_ready()
        if self._waiting:
            log.info("recovered %d waiting workflow steps from the store", len(self._waiting))

    def release_ready(self) -> None:
        """Release the locked steps without inputs recorded since the last call: called once the
        rows of a Submit are all recorded (so their flow record sees what their admission does)."""
        if not self._ready:
            return
        ready, self._ready = self._ready, []
        for task_id in ready:
            w = self._waiting.get(task_id)
            if w is not None and not w.remaining:
                self._release(w, ())

    # ---- outcomes ----------------------------------------------------------------------------
    def ended(self, task_id: str, state: TaskState, result: bytes, error: Error | None) -> None:
        """A watched task ended (``Attempts.finish``): release or end who waited for it. Ends
        that this causes are handled in turn, not nested (a long chain cancels in a loop)."""
        self._ends.append((task_id, state, result, error))
        if self._draining:
            return
        self._draining = True
        try:
            while self._ends:
                self._on_end(*self._ends.popleft())
        finally:
            self._draining = False

    def _on_end(self, task_id: str, state: TaskState, result: bytes, error: Error | None) -> None:
        self._admitting.pop(task_id, None)  # ended while its owner decided: the decision is dropped
        own = self._waiting.pop(task_id, None)
        if own is not None and own.kind == "flow" and state != SUCCEEDED:
            self._cancel_steps(own, f"workflow {task_id} ended {state}")
        waiting = [self._waiting[w] for w in self.watched.pop(task_id, ()) if w in self._waiting]
        waiting.sort(key=lambda w: w.kind == "step")  # the record and on_error first: they see the cause
        for w in waiting:
            if w.id not in self._waiting:
                continue
            w.remaining.discard(task_id)
            if w.kind == "flow":
                self._step_ended(w, task_id, state, result, error)
            elif w.kind == "error":
                if state == FAILED:
                    etype, emsg, _ = error or ("TaskFailed", "", "")
                    self._release(w, (task_id, f"{etype}: {emsg}"))
                elif not w.remaining:
                    self._end(w, CANCELLED, b"", ("TaskCancelled", "no step of the workflow failed", ""))
            elif w.kind == "join":
                self._end_joined(w, state, result, error)
            elif state != SUCCEEDED:
                etype, emsg, _ = error or ("TaskCancelled", "", "")
                self._end(
                    w, CANCELLED, b"", ("TaskCancelled", f"its input {task_id} ended {state}: {etype}: {emsg}", "")
                )
            elif not w.remaining:
                self._release(w, ())

    def _step_ended(self, record: Waiting, step: str, state: TaskState, result: bytes, error: Error | None) -> None:
        """A step of the workflow whose ``record`` this is ended: the record ends with its
        failure, or with the value once every step succeeded."""
        self._add_step_event(record, step, state)
        if state != SUCCEEDED:
            etype, emsg, trace = error or ("TaskCancelled", "", "")
            why = f"step {step} of workflow {record.id} ended {state}: {etype}: {emsg}"
            self._end(record, state, result, (etype, emsg or why, trace), why)
        elif not record.remaining:
            assert record.spec is not None
            value = pickle.dumps(FlowValue(record.spec, self._results(record.spec)), protocol=5)
            self._end(record, SUCCEEDED, value, None)

    def _add_step_event(self, record: Waiting, step: str, state: TaskState) -> None:
        if self._replaying:  # recorded before the restart (or, for a step recovery failed, not at all)
            return
        self._store.add_event(record.id, record.session_id, "step", {"step": step, "state": state})

    def _results(self, spec: Spec) -> dict[str, bytes]:
        ids = _flat(spec)
        found = self._store.results(ids)
        return {step: found.get(step, b"") for step in ids}

    def _release(self, w: Waiting, extra: tuple[Any, ...]) -> None:
        """Its inputs are in: its arguments become the template plus their results; queue it."""
        del self._waiting[w.id]
        template = read_envelope(self._store.args(w.id))["a"] or b""
        results = self._results(w.spec) if w.spec is not None else {}
        args = pickle.dumps(FlowArgs(template, w.spec, results, extra), protocol=5)
        if len(args) > self._max_payload:
            why = f"its inputs' results take {len(args)} bytes pickled, over max_payload_bytes={self._max_payload}"
            self._waiting[w.id] = w  # ended as a waiting one: it never ran
            self._end(w, FAILED, b"", ("SerializationError", why, ""))
            return
        if w.key is None:
            self._store.set_args(w.id, args)
            self._make_due(w.id)
            return
        row = self._store.live_task(w.id)
        if row is not None:
            self._admitting[w.id] = admission = Admission(w, args)
            if self._ask_elsewhere is not None and self._ask_elsewhere(row, w.key, admission):
                return
            self._keys.admit(w.id, w.key, row.name, admission)

    # ---- locked steps ------------------------------------------------------------------------
    def admitted(self, admission: Admission, verdict: str, holder: str, slot: str) -> None:
        """The key's owner decided about a released locked step (``Intake.on_admitted``)."""
        w = admission.step
        assert w.key is not None
        if self._admitting.get(w.id) is not admission:  # it ended meanwhile (cancelled): nothing runs
            if verdict in ("run", "queue"):
                self._keys.free(w.id, w.key, slot)
            return
        del self._admitting[w.id]
        if verdict in ("run", "queue"):
            self._store.lock_step(w.id, w.key, admission.args)
            self._store.requeue(w.id, w.session_id, None, None)
            self._hold(w.id, slot, verdict == "queue")
        elif verdict == "join":
            self._join(w, holder, admission.args)
        else:
            self._waiting[w.id] = w  # ended as a waiting one: it never ran
            why = f"lock key {w.key!r} is held by live task {holder} (on_conflict='reject')"
            self._end(w, FAILED, b"", ("LockConflict", why, ""))
            self._store.lock_step(w.id, w.key, admission.args)  # its key, and arguments a retry can run

    def admitted_elsewhere(self, admission: Admission, verdict: str, holder: str | None) -> None:
        """Another cluster member, holding the key's shard, decided: run or queue -- it took the
        step, and its end is heard like any input's; join or reject -- as a local decision."""
        w = admission.step
        if self._admitting.get(w.id) is not admission:
            return
        if verdict in ("run", "queue", "gone"):
            del self._admitting[w.id]
            return
        self.admitted(admission, verdict, holder or "", "")

    def _join(self, w: Waiting, holder: str, args: bytes) -> None:
        """The step joins the run of ``holder``, the live task holding its key: recorded as a
        waiting row of kind "join" (a restart waits for the holder again), it ends with the
        holder's outcome. The holder ended already if the owner's Release crossed its answer."""
        assert w.key is not None
        self._store.set_args(w.id, envelope("join", holder, [holder], args, key=w.key))
        self._store.add_event(w.id, w.session_id, "joined", {"holder": holder, "key": w.key})
        joined = self._waiting[w.id] = Waiting(w.id, "join", holder, [holder], w.session_id, {holder}, w.key)
        outcome = self._store.outcome(holder)
        if outcome is None:
            self._end_joined(joined, FAILED, b"", ("CapsuleInternalError", f"the holder {holder} is not recorded", ""))
        elif outcome[0] in (SUCCEEDED, FAILED, CANCELLED):
            state, result, (etype, emsg, trace) = outcome
            error = None if state == SUCCEEDED else (etype or "TaskFailed", emsg or "", trace or "")
            self._end_joined(joined, TaskState(state), result or b"", error)
        else:
            self.watched.setdefault(holder, []).append(w.id)

    def _end_joined(self, w: Waiting, state: TaskState, result: bytes, error: Error | None) -> None:
        """A joined step ends with its holder's outcome; then its row gets its key and its
        released arguments (what a ``retry`` of it runs, locked)."""
        args = read_envelope(self._store.args(w.id))["a"]
        self._end(w, state, result, error)
        if w.key is not None and args:
            self._store.lock_step(w.id, w.key, args)

    def _end(self, w: Waiting, state: TaskState, result: bytes, error: Error | None, why: str = "") -> None:
        """End a waiting one without running it (its end comes back through ``ended``)."""
        del self._waiting[w.id]
        task = self._load(w.id)
        if task is not None:
            self._finish(task, state, result, error)
        if w.kind == "flow" and state != SUCCEEDED:
            self._cancel_steps(w, why or f"workflow {w.id} ended {state}")

    def _cancel_steps(self, record: Waiting, reason: str) -> None:
        """The workflow ended without success: every step not finished ends CANCELLED."""
        error = ("TaskCancelled", reason, "")
        for step in record.deps:
            w = self._waiting.get(step)
            if w is not None:
                self._end(w, CANCELLED, b"", error)
                continue
            task = self._tasks.get(step) or self._load(step)
            if task is None or task.state.terminal:
                continue
            if task.state == RUNNING and task.actor is not None:
                self._abandon(task)
            self._finish(task, CANCELLED, b"", error)


def _flat(spec: Spec) -> list[str]:
    return [spec] if isinstance(spec, str) else [s for part in spec for s in _flat(part)]


def _unbound(*_: Any) -> Any:
    raise AssertionError("FlowSteps.bind was not called")
