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
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from ..flows import FlowArgs, FlowValue, Spec, read_envelope
from ..states import CANCELLED, FAILED, RUNNING, SUCCEEDED, TaskState

if TYPE_CHECKING:
    from ..store import Error, TaskStore
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


class FlowSteps:
    """Owns the waiting steps in memory and who waits for which task (``watched``)."""

    def __init__(self, store: TaskStore, tasks: TaskTable, max_payload_bytes: int) -> None:
        self._max_payload = max_payload_bytes  # a released step's arguments (its inputs) must fit a Run
        self._store = store
        self._tasks = tasks
        self.watched: dict[str, list[str]] = {}  # task id -> the waiting ones that depend on it
        self._waiting: dict[str, Waiting] = {}
        self._ends: collections.deque[tuple[str, TaskState, bytes, Error | None]] = collections.deque()
        self._draining = False
        self._replaying = False  # recover(): outcomes seen before the restart are not new events
        # bound once Intake and Attempts exist (they are built after, and are given ``watched``/``add``)
        self._make_due: Callable[[str], None] = _unbound
        self._load: Callable[[str], LiveTask | None] = _unbound
        self._finish: Callable[[LiveTask, TaskState, bytes, Error | None], None] = _unbound
        self._abandon: Callable[[LiveTask], None] = _unbound

    def bind(
        self,
        make_due: Callable[[str], None],
        load: Callable[[str], LiveTask | None],
        finish: Callable[[LiveTask, TaskState, bytes, Error | None], None],
        abandon: Callable[[LiveTask], None],
    ) -> None:
        self._make_due, self._load, self._finish, self._abandon = make_due, load, finish, abandon

    def __len__(self) -> int:
        return len(self._waiting)

    # ---- recording ---------------------------------------------------------------------------
    def add(self, task_id: str, session_id: str | None, args: bytes, new: bool = True) -> None:
        """A waiting step was recorded (``new``), or found in the store at start."""
        try:
            env = read_envelope(args)
        except ProtocolError as exc:
            log.error("workflow step %s cannot be read (%s): it stays SCHEDULED; cancel it", task_id, exc)
            return
        deps = list(env["deps"])
        self._waiting[task_id] = Waiting(task_id, env["k"], env["in"], deps, session_id, set(deps))
        self.watched.setdefault(task_id, [])
        for dep in deps:
            self.watched.setdefault(dep, []).append(task_id)
        if new and env["k"] == "flow":  # its steps and their inputs: FlowHandle.from_id, `capsule-actors flow`
            inputs = {step: self._waiting[step].spec for step in deps if step in self._waiting}
            data = {"steps": deps, "inputs": inputs, "on_error": env.get("h"), "value": env["in"]}
            self._store.add_event(task_id, session_id, "flow", data)

    def recover(self) -> None:
        """At start: the waiting steps from the store, then the outcomes they missed (a step
        whose inputs ended while the supervisor was down, or that recovery just failed)."""
        for task_id, session_id, args in self._store.flow_waiting():
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
        if self._waiting:
            log.info("recovered %d waiting workflow steps from the store", len(self._waiting))

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
                self._add_step_event(w, task_id, state)
                if state != SUCCEEDED:
                    etype, emsg, trace = error or ("TaskCancelled", "", "")
                    why = f"step {task_id} of workflow {w.id} ended {state}: {etype}: {emsg}"
                    self._end(w, state, result, (etype, emsg or why, trace), why)
                elif not w.remaining:
                    assert w.spec is not None
                    self._end(w, SUCCEEDED, pickle.dumps(FlowValue(w.spec, self._results(w.spec)), protocol=5), None)
            elif w.kind == "error":
                if state == FAILED:
                    etype, emsg, _ = error or ("TaskFailed", "", "")
                    self._release(w, (task_id, f"{etype}: {emsg}"))
                elif not w.remaining:
                    self._end(w, CANCELLED, b"", ("TaskCancelled", "no step of the workflow failed", ""))
            elif state != SUCCEEDED:
                etype, emsg, _ = error or ("TaskCancelled", "", "")
                self._end(
                    w, CANCELLED, b"", ("TaskCancelled", f"its input {task_id} ended {state}: {etype}: {emsg}", "")
                )
            elif not w.remaining:
                self._release(w, ())

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
        self._store.set_args(w.id, args)
        self._make_due(w.id)

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
