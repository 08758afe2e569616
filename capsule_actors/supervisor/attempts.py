"""Attempts: dispatch queued tasks to actors with room, start them, and settle how each ends
(result, error and retry, timeout, cancel, crash), including a process actor's held Runs.

The queues, live tasks and actor processes it reads stay on the ``Supervisor`` (every part uses
them); its own counters and the crash plan of tests are here.
"""

from __future__ import annotations

import collections
import logging
import signal
import time
from typing import TYPE_CHECKING

from .. import messages
from ..errors import WorkerCrashed
from .children import ROLE_PROCESS, ROLE_WORKER, ActorProcess
from .live import LiveTask

if TYPE_CHECKING:
    from .core import Supervisor

log = logging.getLogger("capsule_actors.supervisor")

KILL_GRACE = 1.0  # SIGTERM -> SIGKILL for a process actor that is cancelled or timed out


class Attempts:
    """Dispatch and outcomes."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.started_attempts = 0
        self.finished: collections.Counter[str] = collections.Counter()  # tasks ended, by state
        self.crash_plan: dict[str, set[int]] = {}  # task id -> attempts to crash (tests: InjectCrash)

    def settle(self, proc: ActorProcess, cause: str) -> None:
        """The attempts a dead actor had: the ones it began crashed with it (or, when we are
        stopping, run again at the next start); Runs it held but never began go back uncounted."""
        sup = self.sup
        began = [task_id for task_id in proc.running if proc.began(task_id)]
        if proc.running and not began and not proc.stopping:  # its Started may have died with it
            began = [next(iter(proc.running))]  # the Run it held first is the one it ran
            self.mark_started(proc, began[0])
        for task_id, attempt in reversed(list(proc.running.items())):
            task = sup.live.get(task_id)
            if task is None or task.attempts != attempt or task.state != "RUNNING":
                continue
            if task_id not in began:
                self.give_back(task)
            elif sup.stopping:
                self.requeue_unfinished(task)
            else:
                error = (
                    "WorkerCrashed",
                    f"actor {proc.spec.slot} (pid {proc.pid}) died with {cause} while running attempt {attempt}",
                    "",
                )
                self.end(task, "error", error, b"", sup.app.tasks[task.name].retryable(WorkerCrashed))

    def give_back(self, task: LiveTask) -> None:
        """A Run a process actor held but never began: back to the head of its queue, uncounted
        (its row still says QUEUED: an attempt is recorded only once Started)."""
        sup = self.sup
        task.attempts -= 1
        task.state = "QUEUED"
        task.actor = None
        queue = sup.slot_ready[task.owner] if task.owner else sup.ready[sup.role_of(task)]
        queue.appendleft(task.id)

    def requeue_unfinished(self, task: LiveTask) -> None:
        """A graceful stop ran out of time: the attempt does not count; run it at next start."""
        task.attempts -= 1
        task.state = "QUEUED"
        task.actor = None
        self.sup.store.requeue(task.id, task.session_id, None, None, attempts=task.attempts)

    def on_done(self, proc: ActorProcess, msg: messages.Done, frame: bytes) -> None:
        self.attempt_done(proc, msg, frame)
        if msg.began_next:
            self.begun(proc, msg.began_next, None)

    def attempt_done(self, proc: ActorProcess, msg: messages.Done, frame: bytes) -> None:
        sup = self.sup
        proc.tasks_done += 1
        if msg.task_id in proc.abandoned:  # its key was kept until the body really stopped
            proc.abandoned.discard(msg.task_id)
            task_key = sup.abandoned_keys.pop(msg.task_id, None)
            if task_key is not None:
                sup.keys.release(task_key)
            return
        if proc.running.get(msg.task_id) != msg.attempt:
            return
        del proc.running[msg.task_id]
        proc.begun.discard(msg.task_id)
        proc.withdrawing.discard(msg.task_id)
        sup.children.maybe_recycle(proc)
        task = sup.live.get(msg.task_id)
        if task is None or task.attempts != msg.attempt or task.state != "RUNNING":
            return
        error = (msg.error_type, msg.error_message, msg.traceback) if msg.outcome != "ok" else None
        self.end(task, msg.outcome, error, frame, msg.retryable)

    def begun(self, proc: ActorProcess, task_id: str, attempt: int | None) -> None:
        """A process actor began a held Run (its Started, or the Done before it): record the
        attempt's start, and start its timeout now."""
        sup = self.sup
        if task_id not in proc.running or attempt not in (None, proc.running[task_id]):
            if task_id in proc.abandoned:  # cancelled while this news was on its way: stop the body
                self.stop_process(proc)
            return
        task = sup.live.get(task_id)
        if task_id in proc.begun or task is None or task.state != "RUNNING":
            return
        self.mark_started(proc, task_id)
        timeout = sup.app.tasks[task.name].timeout
        if timeout:
            sup.add_timer(timeout, self.process_timeout, task.id, task.attempts)

    def rebalance(self) -> int:
        """Nothing queued but a process actor idle: ask back a Run another one holds behind a
        running task, so a long task never keeps a short one waiting while a slot is free."""
        sup = self.sup
        holders = [p for p in sup.procs.values() if p.spec.role == ROLE_PROCESS and len(p.running) > 1]
        if not holders:  # the common case, checked first: this runs on every turn
            return 0
        idle = sum(1 for p in sup.procs.values() if p.spec.role == ROLE_PROCESS and p.load == 0 and p.has_room())
        asked = 0
        for proc in holders:
            if asked == idle:
                break
            for task_id, attempt in proc.running.items():
                task = sup.live.get(task_id)
                if (
                    not proc.began(task_id)
                    and task_id not in proc.withdrawing
                    and task is not None
                    and task.owner is None
                ):  # a locked task belongs to its key's owner
                    proc.withdrawing.add(task_id)
                    sup.send_actor(proc, messages.Withdraw(task_id, attempt).encode())
                    asked += 1
                    break
        return asked

    def on_held_run(self, proc: ActorProcess, msg: messages.Started | messages.Withdrawn) -> None:
        """A process actor began a held Run (Started), or gave it back (Withdrawn)."""
        if isinstance(msg, messages.Started):
            self.begun(proc, msg.task_id, msg.attempt)
            return
        proc.withdrawing.discard(msg.task_id)
        if msg.task_id in proc.abandoned:  # cancelled meanwhile: this is the answer it waited for
            proc.abandoned.discard(msg.task_id)
            return
        task = self.sup.live.get(msg.task_id)
        if proc.running.get(msg.task_id) != msg.attempt or proc.began(msg.task_id) or task is None:
            return
        del proc.running[msg.task_id]
        self.give_back(task)

    def mark_started(self, proc: ActorProcess, task_id: str) -> None:
        task = self.sup.live[task_id]
        proc.begun.add(task_id)
        proc.withdrawing.discard(task_id)
        self.sup.store.mark_running(task.id, task.session_id, task.attempts, proc.spec.slot, time.time())

    def dispatch(self) -> int:
        """Start queued attempts on actors with room; return how many messages that sent."""
        sup = self.sup
        if sup.stopping:
            return 0
        started = self.started_attempts
        sup.intake.page_in()
        for slot, queue in sup.slot_ready.items():
            proc = sup.procs.get(slot)
            while queue and proc is not None and proc.has_room():
                task = sup.live.get(queue.popleft())
                if task is not None and task.state == "QUEUED" and not task.blocked:
                    self.start(task, proc)
        for role, queue in sup.ready.items():
            while queue:
                task = sup.live.get(queue[0])
                if task is None or task.state != "QUEUED":
                    queue.popleft()
                    continue
                proc = self.pick(role)
                if proc is None:
                    break
                queue.popleft()
                self.start(task, proc)
        withdrawn = 0 if sup.ready[ROLE_PROCESS] else self.rebalance()
        return self.started_attempts - started + withdrawn

    def pick(self, role: str) -> ActorProcess | None:
        best = None
        for proc in self.sup.procs.values():
            if proc.spec.role == role and proc.has_room() and (best is None or proc.load < best.load):
                best = proc
        return best

    def start(self, task: LiveTask, proc: ActorProcess) -> None:
        sup = self.sup
        spec = sup.app.tasks[task.name]
        self.started_attempts += 1
        task.attempts += 1
        task.state = "RUNNING"
        task.actor = proc
        held = proc.spec.role == ROLE_PROCESS and proc.load > 0  # it runs this after the one it has
        proc.running[task.id] = task.attempts
        # Arguments live in the store only (RAM stays flat): the update that starts the attempt
        # reads them. A held Run's attempt is recorded when it begins (``begun``).
        if held:
            payload = sup.store.args(task.id)
        else:
            payload = sup.store.mark_running(task.id, task.session_id, task.attempts, proc.spec.slot, time.time())
            if proc.spec.role == ROLE_PROCESS:
                proc.begun.add(task.id)
        crash = task.attempts in self.crash_plan.get(task.name, ())
        actor_timeout = spec.timeout if proc.spec.role == ROLE_WORKER else None
        run = messages.Run(
            task.id, task.attempts, task.name, task.session_id, task.session_owner, actor_timeout, crash, held
        )
        sup.send_actor(proc, run.encode(), payload)
        if spec.timeout and proc.spec.role == ROLE_PROCESS and not held:
            sup.add_timer(spec.timeout, self.process_timeout, task.id, task.attempts)

    def process_timeout(self, task_id: str, attempt: int) -> None:
        task = self.sup.live.get(task_id)
        if task is None or task.attempts != attempt or task.state != "RUNNING":
            return
        timeout = self.sup.app.tasks[task.name].timeout
        self.abandon(task, "timeout")
        self.end(task, "timeout", ("TaskTimeout", f"attempt {attempt} ran past timeout={timeout} s", ""), b"", True)

    def abandon(self, task: LiveTask, why: str) -> None:
        """Stop caring about a running attempt; a process actor is killed and replaced."""
        proc = task.actor
        assert proc is not None
        attempt = proc.running.pop(task.id, None)
        if attempt is None:
            return
        proc.abandoned.add(task.id)
        if task.lock_key is not None and proc.spec.role == ROLE_WORKER:
            self.sup.abandoned_keys[task.id] = task
        if proc.spec.role == ROLE_PROCESS and task.id in proc.begun:
            self.stop_process(proc)
        else:  # a process actor drops a Run it has not begun (or its Started comes and we kill it)
            self.sup.send_actor(proc, messages.CancelRun(task.id, attempt).encode())

    def stop_process(self, proc: ActorProcess) -> None:
        """Kill a process actor to stop the body it runs; the Run it holds is given back."""
        proc.stopping = True
        self.sup.children.kill_actor(proc, signal.SIGTERM)
        self.sup.add_timer(KILL_GRACE, self.kill_if_alive, proc)

    def kill_if_alive(self, proc: ActorProcess) -> None:
        if self.sup.procs.get(proc.spec.slot) is proc:
            self.sup.children.kill_actor(proc)

    def end(
        self, task: LiveTask, outcome: str, error: tuple[str, str, str] | None, frame: bytes, retryable: bool
    ) -> None:
        sup = self.sup
        task.actor = None
        if outcome == "ok":
            self.finish(task, "SUCCEEDED", frame, None)
            return
        if outcome == "cancelled":
            self.finish(task, "CANCELLED", b"", error)
            return
        spec = sup.app.tasks[task.name]
        if retryable and task.attempts < 1 + spec.retries:
            delay = spec.backoff.delay(task.attempts)
            task.state = "QUEUED"
            sup.store.requeue(task.id, task.session_id, time.time() + delay if delay else None, error)
            sup.queue(task, time.time() + delay if delay else None)
            return
        self.finish(task, "FAILED", frame, error)

    def finish(self, task: LiveTask, state: str, result: bytes, error: tuple[str, str, str] | None) -> None:
        sup = self.sup
        sup.store.finish(task.id, task.session_id, state, result or None, error, time.time())
        self.finished[state] += 1
        sup.live.pop(task.id, None)
        task.state = state
        if task.lock_key is not None and task.id not in sup.abandoned_keys:
            sup.keys.release(task)  # else: when its abandoned attempt reports, or its actor is replaced
        body = [state, *(error or (None, None, None))]
        for ident, req in task.waiters:
            sup.requests.waiter_index.pop((ident, req), None)
            sup.reply(ident, req, True, body, [result or b""])
        task.waiters.clear()
