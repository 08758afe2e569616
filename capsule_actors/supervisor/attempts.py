"""Attempts: dispatch queued tasks to actors with room, start them, and settle how each ends
(result, error and retry, timeout, cancel, crash), including a process actor's held Runs."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import messages
from ..errors import WorkerCrashed
from ..states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TaskState
from .specs import ROLE_PROCESS, ROLE_WORKER, ActorProcess

if TYPE_CHECKING:
    from ..app import App
    from ..store import Error, TaskStore
    from .children import Children
    from .flows import FlowSteps
    from .keys import KeyRouting
    from .limits import Limits
    from .outbox import Frames, Outbox
    from .tally import TaskTally
    from .tasks import LiveTask, TaskTable
    from .timers import Timers
    from .waiters import Waiters

log = logging.getLogger("capsule_actors.supervisor")

_EVENT_OF = {SUCCEEDED: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}  # a finish, as /metrics counts it


class Attempts:
    """Dispatch and outcomes; the started/finished counters and the crash plan of tests."""

    def __init__(
        self,
        app: App,
        store: TaskStore,
        tasks: TaskTable,
        children: Children,
        keys: KeyRouting,
        limits: Limits,
        flows: FlowSteps,
        waiters: Waiters,
        outbox: Outbox,
        timers: Timers,
        dead_letter: Callable[[str, str, Error | None], None],
        tally: TaskTally,
    ) -> None:
        self._app = app
        self._limits = limits
        self._flow_watched = flows.watched  # the tasks a workflow step waits for (FlowSteps owns it)
        self._flow_ended = flows.ended
        self._dead_letter = dead_letter  # a task failed for good (Intake runs the on_failure hook)
        self._store = store
        self._tasks = tasks
        self._children = children
        self._keys = keys
        self._waiters = waiters
        self._outbox = outbox
        self._timers = timers
        self._tally = tally
        self._timed = tally.enabled  # /metrics is served: count events and time waits and runs
        self._gated = limits.gated  # the task names with a rate or concurrency limit
        self.started_attempts = 0
        self._starting: list[tuple[LiveTask, str]] = []  # Runs queued, their starts not written yet
        self.finished: collections.Counter[str] = collections.Counter()  # tasks ended, by state
        self.crash_plan: dict[str, set[int]] = {}  # task name -> attempts to crash (tests: InjectCrash)

    def count_finished(self) -> None:
        """Recount the finished tasks from the store (at start, and after retention pruned some)."""
        counts = self._store.counts()
        self.finished = collections.Counter({k: v for k, v in counts.items() if TaskState(k).terminal})

    # ---- dispatch ----------------------------------------------------------------------------
    def dispatch(self) -> int:
        """Start queued attempts on actors with room; return how many messages that sent."""
        if self._children.stopping:
            return 0
        tasks, started = self._tasks, self.started_attempts
        gated, limits = self._limits.gated, self._limits
        for slot, queue in tasks.slot_ready.items():
            proc = self._children.get(slot)
            while queue and proc is not None and proc.has_room():
                task = tasks.get(queue.popleft())
                if (
                    task is not None
                    and task.state == QUEUED
                    and not task.blocked
                    and (task.name not in gated or limits.admit(task))
                ):
                    self.start(task, proc)
        for role, queue in tasks.ready.items():
            while top := queue.top:  # the level of the highest priority with tasks
                task = tasks.get(top[0])
                if task is None or task.state != QUEUED:
                    queue.popleft()
                    continue
                proc = self._pick(role)
                if proc is None:
                    break
                queue.popleft()
                if task.name not in gated or limits.admit(task):  # else held back by its limit
                    self.start(task, proc)
        withdrawn = 0 if tasks.ready[ROLE_PROCESS] else self._rebalance()
        return self.started_attempts - started + withdrawn

    def _pick(self, role: str) -> ActorProcess | None:
        best = None
        for proc in self._children:
            if proc.spec.role == role and proc.has_room() and (best is None or proc.load < best.load):
                best = proc
        return best

    def start(self, task: LiveTask, proc: ActorProcess) -> None:
        spec = self._app.tasks[task.name]
        self.started_attempts += 1
        task.attempts += 1
        task.state = RUNNING
        task.actor = proc
        held = proc.spec.role == ROLE_PROCESS and proc.load > 0  # it runs this after the one it has
        proc.running[task.id] = task.attempts
        # The attempt's start is written once its Run is sent (``record_starts``: the store's
        # writes overlap the actor's work; they commit together anyway, see core._turn). A held
        # Run's attempt is recorded when it begins (``_begun``).
        payload = self._store.args(task.id)
        if not held:
            self._starting.append((task, proc.spec.slot))
            if self._timed:
                self._began(task)
            if proc.spec.role == ROLE_PROCESS:
                proc.begun.add(task.id)
        crash = task.attempts in self.crash_plan.get(task.name, ())
        actor_timeout = spec.timeout if proc.spec.role == ROLE_WORKER else None
        run = messages.Run(
            task.id,
            task.attempts,
            task.name,
            task.session_id,
            task.session_owner,
            actor_timeout,
            crash,
            held,
            task.trace,
            task.link,
        )
        self._outbox.to_actor(proc, run.encode(), payload)
        if spec.timeout and proc.spec.role == ROLE_PROCESS and not held:
            self._timers.add(spec.timeout, self._process_timeout, task.id, task.attempts)

    def record_starts(self) -> None:
        """Write the starts of the attempts whose Runs went out (or are about to: a commit
        records them first)."""
        if not self._starting:
            return
        starting, self._starting = self._starting, []
        now, mark_running = time.time(), self._store.mark_running
        for task, slot in starting:
            mark_running(task.id, task.session_id, task.attempts, slot, now)

    # ---- held Runs ---------------------------------------------------------------------------
    def _rebalance(self) -> int:
        """Nothing queued but a process actor idle: ask back a Run another one holds behind a
        running task, so a long task never keeps a short one waiting while a slot is free."""
        holders = [p for p in self._children if p.spec.role == ROLE_PROCESS and len(p.running) > 1]
        if not holders:  # the common case, checked first: this runs on every turn
            return 0
        idle = sum(1 for p in self._children if p.spec.role == ROLE_PROCESS and p.load == 0 and p.has_room())
        asked = 0
        for proc in holders:
            if asked == idle:
                break
            asked += self._withdraw(proc, limit=1)
        return asked

    def withdraw_held(self) -> None:
        """The supervisor is stopping: ask back every Run held behind a running one, so no new
        attempt begins while the actors wait for their turn to stop."""
        for proc in self._children:
            if proc.spec.role == ROLE_PROCESS and len(proc.running) > 1:
                self._withdraw(proc, limit=len(proc.running))

    def _withdraw(self, proc: ActorProcess, limit: int) -> int:
        asked = 0
        for task_id, attempt in proc.running.items():
            if asked == limit:
                break
            task = self._tasks.get(task_id)
            if (
                not proc.began(task_id)
                and task_id not in proc.withdrawing
                and task is not None
                and task.owner is None  # a locked task belongs to its key's owner
            ):
                proc.withdrawing.add(task_id)
                self._outbox.to_actor(proc, messages.Withdraw(task_id, attempt).encode())
                asked += 1
        return asked

    def on_held_run(self, proc: ActorProcess, msg: messages.Started | messages.Withdrawn, payload: Frames) -> None:
        """A process actor began a held Run (Started), or gave it back (Withdrawn)."""
        if isinstance(msg, messages.Started):
            self._begun(proc, msg.task_id, msg.attempt)
            return
        proc.withdrawing.discard(msg.task_id)
        if msg.task_id in proc.abandoned:  # cancelled meanwhile: this is the answer it waited for
            proc.abandoned.discard(msg.task_id)
            return
        task = self._tasks.get(msg.task_id)
        if proc.running.get(msg.task_id) != msg.attempt or proc.began(msg.task_id) or task is None:
            return
        del proc.running[msg.task_id]
        self._give_back(task)

    def _begun(self, proc: ActorProcess, task_id: str, attempt: int | None) -> None:
        """A process actor began a held Run (its Started, or the Done before it): record the
        attempt's start, and start its timeout now."""
        if task_id not in proc.running or attempt not in (None, proc.running[task_id]):
            if task_id in proc.abandoned:  # cancelled while this news was on its way: stop the body
                self._children.replace(proc)
            return
        task = self._tasks.get(task_id)
        if task_id in proc.begun or task is None or task.state != RUNNING:
            return
        self._mark_started(proc, task)
        timeout = self._app.tasks[task.name].timeout
        if timeout:
            self._timers.add(timeout, self._process_timeout, task.id, task.attempts)

    def _mark_started(self, proc: ActorProcess, task: LiveTask) -> None:
        proc.begun.add(task.id)
        proc.withdrawing.discard(task.id)
        self._store.mark_running(task.id, task.session_id, task.attempts, proc.spec.slot, time.time())
        if self._timed:
            self._began(task)

    def _began(self, task: LiveTask) -> None:
        """An attempt is recorded as started: count it, and how long the task waited for it
        (only when /metrics is served: ``_timed``)."""
        now = time.monotonic()
        self._tally.started(task.name, now - task.since)
        task.since = now

    def _give_back(self, task: LiveTask) -> None:
        """A Run a process actor held but never began: back to the head of its queue, uncounted
        (its row still says QUEUED: an attempt is recorded only once Started)."""
        task.attempts -= 1
        self._limits.ended(task)
        self._tasks.put_back(task)

    # ---- outcomes ----------------------------------------------------------------------------
    def on_done(self, proc: ActorProcess, msg: messages.Done, payload: Frames) -> None:
        self._attempt_done(proc, msg, payload[0] if payload else b"")
        if msg.began_next:
            self._begun(proc, msg.began_next, None)

    def _attempt_done(self, proc: ActorProcess, msg: messages.Done, frame: bytes) -> None:
        proc.tasks_done += 1
        if msg.task_id in proc.abandoned:  # its key was kept until the body really stopped
            proc.abandoned.discard(msg.task_id)
            unwound = self._tasks.unwound(msg.task_id)
            if unwound is not None:
                self._keys.release(unwound)
            return
        if proc.running.get(msg.task_id) != msg.attempt:
            return
        del proc.running[msg.task_id]
        proc.begun.discard(msg.task_id)
        proc.withdrawing.discard(msg.task_id)
        self._children.maybe_recycle(proc)
        task = self._tasks.get(msg.task_id)
        if task is None or task.attempts != msg.attempt or task.state != RUNNING:
            return
        error = (msg.error_type, msg.error_message, msg.traceback) if msg.outcome != "ok" else None
        if msg.trace:
            task.link = msg.trace  # a retry's span links to this attempt's
        self.end(task, msg.outcome, error, frame, msg.retryable)

    def _process_timeout(self, task_id: str, attempt: int) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.attempts != attempt or task.state != RUNNING:
            return
        timeout = self._app.tasks[task.name].timeout
        self.abandon(task)
        error = ("TaskTimeout", f"attempt {attempt} ran past timeout={timeout} s", "")
        self.end(task, "timeout", error, b"", True)

    def abandon(self, task: LiveTask) -> None:
        """Stop caring about a running attempt (cancel, timeout); a process actor running it is
        killed and replaced."""
        proc = task.actor
        assert proc is not None
        attempt = proc.running.pop(task.id, None)
        if attempt is None:
            return
        proc.abandoned.add(task.id)
        if task.lock_key is not None and proc.spec.role == ROLE_WORKER:
            self._tasks.abandon_key(task)
        if proc.spec.role == ROLE_PROCESS and task.id in proc.begun:
            self._children.replace(proc)
        else:  # a process actor drops a Run it has not begun (or its Started comes and we kill it)
            self._outbox.to_actor(proc, messages.CancelRun(task.id, attempt).encode())

    def end(self, task: LiveTask, outcome: str, error: Error | None, frame: bytes, retryable: bool) -> None:
        """An attempt ended: success, cancel, a retry after its backoff, or failure for good."""
        task.actor = None
        if self._timed:
            self._tally.ran(task.name, time.monotonic() - task.since)
            if outcome == "timeout":
                self._tally.count("timed_out", task.name)
            elif error is not None and error[0] == "WorkerCrashed":
                self._tally.count("crashed", task.name)
        if outcome == "ok":
            self.finish(task, SUCCEEDED, frame, None)
            return
        if outcome == "cancelled":
            self.finish(task, CANCELLED, b"", error)
            return
        spec = self._app.tasks[task.name]
        if retryable and task.attempts < 1 + spec.retries:
            delay = spec.backoff.delay(task.attempts)
            run_at = time.time() + delay if delay else None
            task.state = QUEUED
            if task.name in self._gated:
                self._limits.ended(task)
            self._store.requeue(task.id, task.session_id, run_at, error)
            self._tally.count("retried", task.name)
            self._tasks.queue(task, run_at)
            return
        self.finish(task, FAILED, frame, error)

    def finish(self, task: LiveTask, state: TaskState, result: bytes, error: Error | None) -> None:
        if task.name in self._gated:
            self._limits.ended(task)
        self._store.finish(task.id, task.session_id, state, result or None, error, time.time())
        self.finished[state] += 1
        if self._timed:
            self._tally.count(_EVENT_OF[state], task.name)
        self._tasks.remove(task.id)
        task.state = state
        if task.lock_key is not None and task.id not in self._tasks.abandoned_keys:
            self._keys.release(task)  # else: when its abandoned attempt reports, or its actor is replaced
        self._waiters.settle(task.id, messages.Outcome(state, *(error or (None, None, None))), result or b"")
        if state == FAILED:
            self._dead_letter(task.id, task.name, error)
        if task.id in self._flow_watched:
            self._flow_ended(task.id, state, result, error)

    def cancel(self, task: LiveTask) -> None:
        """Cancelled by request: a running attempt is abandoned (its actor told, or replaced)."""
        if task.state == RUNNING and task.actor is not None:
            self.abandon(task)
        self.finish(task, CANCELLED, b"", ("TaskCancelled", "cancelled by request", ""))

    # ---- an actor died -----------------------------------------------------------------------
    def actor_exited(self, proc: ActorProcess, cause: str) -> None:
        """The attempts a dead actor had: the ones it began crashed with it (or, when we are
        stopping, run again at the next start); Runs it held but never began go back uncounted;
        the keys of abandoned bodies that died with it are free."""
        for task_id in proc.abandoned:
            unwound = self._tasks.unwound(task_id)
            if unwound is not None:
                self._keys.release(unwound)
        began = [task_id for task_id in proc.running if proc.began(task_id)]
        if proc.running and not began and not proc.stopping:  # its Started may have died with it
            first = self._tasks.get(next(iter(proc.running)))
            if first is not None:  # the Run it held first is the one it ran
                began = [first.id]
                self._mark_started(proc, first)
        for task_id, attempt in reversed(list(proc.running.items())):
            task = self._tasks.get(task_id)
            if task is None or task.attempts != attempt or task.state != RUNNING:
                continue
            if task_id not in began:
                self._give_back(task)
            elif self._children.stopping:
                self._requeue_unfinished(task)
            else:
                error = (
                    "WorkerCrashed",
                    f"actor {proc.spec.slot} (pid {proc.pid}) died with {cause} while running attempt {attempt}",
                    "",
                )
                self.end(task, "error", error, b"", self._app.tasks[task.name].retryable(WorkerCrashed))

    def _requeue_unfinished(self, task: LiveTask) -> None:
        """A graceful stop ran out of time: the attempt does not count; run it at next start."""
        task.attempts -= 1
        task.state = QUEUED
        task.actor = None
        self._limits.ended(task)
        self._store.requeue(task.id, task.session_id, None, None, attempts=task.attempts)
