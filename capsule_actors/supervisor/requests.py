"""The supervisor's answers to client requests other than submits: waits, cancels, info,
listings, status, event long-polls, retries, session.db for worker nodes.

The waits it answers (``waiter_index``, ``parked``, ``event_waiters``) are kept here; the live
tasks stay on the ``Supervisor``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from .. import messages
from ..app import new_task_id
from ..errors import CapsuleError, CapsuleInternalError, ConfigError, ProtocolError, UnknownTask
from .children import actor_status
from .intake import NO_ARGS
from .live import PendingSubmit

if TYPE_CHECKING:
    from .core import Frames, Supervisor

log = logging.getLogger("capsule_actors.supervisor")

EVENT_RETENTION = 7 * 24 * 3600.0  # events older than this are pruned (task records are kept)
EVENT_MAX_ROWS = 1_000_000  # and at most this many events are kept
EVENT_PRUNE_INTERVAL = 60.0
STATES = ("QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


class ClientRequests:
    """Answers what clients ask; a Submit goes to ``Intake``."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.waiter_index: dict[tuple[bytes, int], str] = {}  # (client, req) -> the task it waits for
        self.parked: dict[str, list[tuple[bytes, int]]] = {}  # waits on tasks held in the store only
        # long polls of h.events() ("t", task id) and app.subscribe() ("s", session id)
        self.event_waiters: dict[tuple[str, str], list[tuple[bytes, int, int]]] = {}
        self.handlers: dict[type, Callable[[bytes, Any, Frames], None]] = {
            messages.Submit: sup.intake.on_submit,
            messages.Wait: self.on_wait,
            messages.Forget: self.on_forget,
            messages.Info: self.on_info,
            messages.Cancel: self.on_cancel,
            messages.ListTasks: self.on_list,
            messages.Status: self.on_status,
            messages.Events: self.on_events,
            messages.InjectCrash: self.on_inject_crash,
            messages.SessionEvents: self.on_session_events,
            messages.AllEvents: self.on_all_events,
            messages.Retry: self.on_retry,
            messages.SessionKV: self.on_session_kv,
        }

    def on_message(self, frames: Frames) -> None:
        sup = self.sup
        if len(frames) < 2:
            raise ProtocolError("client message without a header frame")
        ident, payload = frames[0], frames[2:]
        try:
            msg = messages.decode(frames[1])
        except ProtocolError as exc:  # answered when it says which request it is: e.g. another version
            req = messages.request_id(frames[1], self.handlers)
            if req is not None:
                sup.error_reply(
                    ident,
                    req,
                    ProtocolError(f"the supervisor cannot read this request: {exc}; {messages.version_hint()}"),
                )
            raise
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{type(msg).__name__} is not a client request")
        try:
            handler(ident, msg, payload)
        except CapsuleError as exc:
            sup.error_reply(ident, msg.req, exc)  # type: ignore[attr-defined]
        except Exception as exc:
            sup.error_reply(ident, msg.req, CapsuleInternalError(f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
            raise

    def on_wait(self, ident: bytes, msg: messages.Wait, payload: Frames) -> None:
        sup = self.sup
        task = sup.live.get(msg.task_id)
        if task is not None:
            task.waiters.append((ident, msg.req))
            self.waiter_index[(ident, msg.req)] = task.id
            return
        outcome = sup.store.outcome(msg.task_id)
        if outcome is None:
            raise self.unknown(msg.task_id)
        state, result, error = outcome
        if state in ("SCHEDULED", "QUEUED"):  # delayed, or in the backlog: in the store only for now
            self.parked.setdefault(msg.task_id, []).append((ident, msg.req))
            self.waiter_index[(ident, msg.req)] = msg.task_id
            return
        sup.reply(ident, msg.req, True, [state, *error], [result or b""])

    def on_forget(self, ident: bytes, msg: messages.Forget, payload: Frames) -> None:
        sup = self.sup
        task_id = self.waiter_index.pop((ident, msg.req), None)
        task = sup.live.get(task_id) if task_id else None
        if task is not None:
            task.waiters = [w for w in task.waiters if w != (ident, msg.req)]
        elif task_id in self.parked:
            self.parked[task_id] = [w for w in self.parked[task_id] if w != (ident, msg.req)]
            if not self.parked[task_id]:
                del self.parked[task_id]
        for waiters in self.event_waiters.values():
            waiters[:] = [w for w in waiters if (w[0], w[1]) != (ident, msg.req)]

    def on_info(self, ident: bytes, msg: messages.Info, payload: Frames) -> None:
        self.sup.reply(ident, msg.req, True, [self.sup.store.info(tid) for tid in msg.task_ids[:1000]])

    def on_cancel(self, ident: bytes, msg: messages.Cancel, payload: Frames) -> None:
        sup = self.sup
        task = sup.live.get(msg.task_id) or sup.intake.load_stored(msg.task_id)
        if task is None:
            if sup.store.info(msg.task_id) is None:
                raise self.unknown(msg.task_id)
            sup.reply(ident, msg.req, True, False)
            return
        if task.state == "RUNNING" and task.actor is not None:
            sup.attempts.abandon(task, "cancel")
        sup.attempts.finish(task, "CANCELLED", b"", ("TaskCancelled", "cancelled by request", ""))
        sup.reply(ident, msg.req, True, True)

    def on_list(self, ident: bytes, msg: messages.ListTasks, payload: Frames) -> None:
        sup = self.sup
        if msg.state is not None and msg.state not in STATES:
            raise ConfigError(f"unknown state {msg.state!r}; expected one of {', '.join(STATES)}")
        if not 1 <= msg.limit <= 100_000:
            raise ConfigError(f"limit={msg.limit}: expected 1..100000")
        rows = sup.store.list_tasks(msg.state, msg.limit)
        for row in rows:
            key, name = row["lock_key"], row["name"]
            row["owner"] = sup.owner_of(name, key) if key is not None and name in sup.app.tasks else None
        sup.reply(ident, msg.req, True, rows)

    def on_status(self, ident: bytes, msg: messages.Status, payload: Frames) -> None:
        sup = self.sup
        keys = collections.Counter(t.owner for t in sup.live.values() if t.owner and not t.blocked)
        actors = []
        for spec in sup.all_specs():
            proc = sup.procs.get(spec.slot)
            actors.append(
                actor_status(
                    proc,
                    spec,
                    sup.children.slots[spec.slot],
                    keys[spec.slot],
                    sup.children.rss_of(proc) if proc is not None and spec.node else None,
                )
            )
        now = time.monotonic()
        body = {
            "supervisor": {
                "pid": os.getpid(),
                "state": "stopping" if sup.stopping else "running",
                "started_at": sup.started_at,
                "state_dir": str(sup.state_dir),
                "rss": psutil.Process().memory_info().rss,
                "endpoint": sup.client_addr,
                "live_tasks": len(sup.live) + sup.intake.backlog,
                "in_memory": len(sup.live),
                "backlog": sup.intake.backlog,
            },
            "actors": actors,
            "nodes": sup.node_link.status(now),
            "tasks": self.task_counts(),
        }
        sup.reply(ident, msg.req, True, body)

    def task_counts(self) -> dict[str, int]:
        """Tasks per state, without scanning the table: live ones from memory, finished ones
        counted as they finish."""
        sup = self.sup
        counts = collections.Counter(task.state for task in sup.live.values() if task.state != "SCHEDULED")
        held = sum(len(proc.running) - proc.busy for proc in sup.procs.values())  # sent, not begun
        counts["RUNNING"] -= held
        counts["QUEUED"] += held
        counts["QUEUED"] += sup.intake.backlog
        counts.update(sup.attempts.finished)
        counts["SCHEDULED"] = sup.store.count_state("SCHEDULED")  # most of them live in the store only
        return {state: n for state, n in counts.items() if n}

    def on_events(self, ident: bytes, msg: messages.Events, payload: Frames) -> None:
        if msg.task_id not in self.sup.live and self.sup.store.info(msg.task_id) is None:
            raise self.unknown(msg.task_id)
        self.poll_events(ident, msg.req, ("t", msg.task_id), msg.after)

    def on_session_events(self, ident: bytes, msg: messages.SessionEvents, payload: Frames) -> None:
        self.poll_events(ident, msg.req, ("s", msg.session_id), msg.after)

    def on_all_events(self, ident: bytes, msg: messages.AllEvents, payload: Frames) -> None:
        self.poll_events(ident, msg.req, ("a", ""), msg.after)

    def on_retry(self, ident: bytes, msg: messages.Retry, payload: Frames) -> None:
        sup = self.sup
        row = sup.store.retry_row(msg.task_id)
        if row is None:
            raise self.unknown(msg.task_id)
        name, state, lock_key, sid, sowner, args = row
        if state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise ConfigError(f"task {msg.task_id} is {state}: only a finished task can be retried")
        sup.app.get_task(name)
        item = [new_task_id(), name, lock_key, sid, sowner, None]
        sup.intake.submit(PendingSubmit(ident, msg.req, 1), [item], [bytes(args or NO_ARGS)])

    def on_session_kv(self, ident: bytes, msg: messages.SessionKV, payload: Frames) -> None:
        """session.db for tasks on worker nodes: the same table, written in this turn's
        transaction (so the reply goes out after the commit)."""
        sup = self.sup
        from ..session import kv_delete, kv_get, kv_items, kv_set

        db, sid, key = sup.store.db, msg.session_id, msg.key
        if msg.value is not None:
            if len(msg.value) > sup.app.max_payload_bytes:
                raise ConfigError(f"session.db value of {len(msg.value)} bytes is over max_payload_bytes")
            try:
                json.loads(msg.value)
            except ValueError:
                raise ProtocolError("SessionKV value is not JSON") from None
        body: Any
        if msg.op == "get":
            body = kv_get(db, sid, key)
        elif msg.op == "set":
            kv_set(db, sid, key, msg.value or "null")
            body = True
        elif msg.op == "del":
            body = kv_delete(db, sid, key)
        elif msg.op == "items":
            body = [list(row) for row in kv_items(db, sid)]
        else:  # cas
            body = kv_get(db, sid, key) == msg.expected
            if body:
                kv_set(db, sid, key, msg.value or "null")
        sup.reply(ident, msg.req, True, body)

    def poll_events(self, ident: bytes, req: int, key: tuple[str, str], after: int) -> None:
        if not self.send_events(ident, req, key, after):
            self.event_waiters.setdefault(key, []).append((ident, req, after))
            self.waiter_index[(ident, req)] = key[1]

    def send_events(self, ident: bytes, req: int, key: tuple[str, str], after: int) -> bool:
        """Reply with events after ``after`` if there are any (or the task has ended)."""
        sup = self.sup
        limit = 500
        if key[0] == "t":
            events = sup.store.events_after(after, limit, task_id=key[1])
            terminal = key[1] not in sup.live and sup.store.live_row(key[1]) is None
        elif key[0] == "s":
            events, terminal = sup.store.events_after(after, limit, session_id=key[1]), False
        else:
            events, terminal = sup.store.events_after(after, limit), False
        if not events and not terminal:
            return False
        sup.reply(ident, req, True, {"events": events, "terminal": terminal, "more": len(events) == limit})
        return True

    def answer_event_waiters(self) -> None:
        sup = self.sup
        tasks, sessions, any_event = sup.store.take_touched()
        touched = {("t", t) for t in tasks} | {("s", s) for s in sessions} | ({("a", "")} if any_event else set())
        for key in touched & self.event_waiters.keys():
            for ident, req, after in self.event_waiters.pop(key):
                self.waiter_index.pop((ident, req), None)
                if not self.send_events(ident, req, key, after):
                    self.poll_events(ident, req, key, after)

    def prune_events(self) -> None:
        """Retention: old events, and finished tasks past the app's result_ttl."""
        sup = self.sup
        removed = sup.store.prune_events(time.time() - EVENT_RETENTION, EVENT_MAX_ROWS)
        if sup.app.result_ttl is not None:
            pruned = sup.store.prune_finished(time.time() - sup.app.result_ttl)
            if pruned:  # rare: recount the finished tasks rather than track each pruned state
                sup.attempts.finished = collections.Counter(
                    {k: v for k, v in sup.store.counts().items() if k in ("SUCCEEDED", "FAILED", "CANCELLED")}
                )
            removed += pruned
        if removed:
            log.info("retention: removed %d old events and finished tasks", removed)
        sup.add_timer(
            max(0.5, min(EVENT_PRUNE_INTERVAL, sup.app.result_ttl or EVENT_PRUNE_INTERVAL)), self.prune_events
        )

    def on_inject_crash(self, ident: bytes, msg: messages.InjectCrash, payload: Frames) -> None:
        sup = self.sup
        sup.app.get_task(msg.name)
        sup.attempts.crash_plan.setdefault(msg.name, set()).add(msg.attempt)
        sup.reply(ident, msg.req, True, True)

    @staticmethod
    def unknown(task_id: str) -> CapsuleError:
        return UnknownTask(f"no task with id {task_id!r} in this runtime")
