"""Tasks coming in: submits (validated, recorded, or sent for lock admission first), journals
of clients that died, schedule firings, delayed tasks coming due, and the backlog that keeps a
deep queue in SQLite rather than in memory."""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import journal, messages
from ..app import new_task_id
from ..errors import Backpressure, CapsuleError, ProtocolError, SerializationError
from .children import ROLE_PROCESS, ROLE_WORKER
from .live import LiveTask, PendingSubmit

if TYPE_CHECKING:
    from .core import Frames, Supervisor

log = logging.getLogger("capsule_actors.supervisor")

QUEUE_WINDOW = 10_000  # queued unlocked tasks held in memory; more wait in SQLite only (the backlog)
JOURNAL_SWEEP = 1.0  # how often the submit journals of clients that died are looked for
NO_ARGS = pickle.dumps(((), {}), protocol=5)  # a scheduled firing's arguments (none)


class Intake:
    """Records what is submitted; holds the backlog's bookkeeping on the ``Supervisor``."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        # Unlocked QUEUED tasks beyond QUEUE_WINDOW stay in the store only: all of them have a
        # rowid above backlog_after, and page_in loads them in submit order as the queue drains.
        self.backlog = 0
        self.backlog_after = 0

    def on_submit(self, ident: bytes, msg: messages.Submit, payload: Frames) -> None:
        sup = self.sup
        if len(payload) != len(msg.items):
            raise ProtocolError(f"Submit has {len(msg.items)} items but {len(payload)} payload frames")
        for item, frame in zip(msg.items, payload):
            sup.app.get_task(item[1])
            if len(frame) > sup.app.max_payload_bytes:
                raise SerializationError(f"payload of {len(frame)} bytes is over max_payload_bytes")
        if not msg.journaled and len(sup.live) + self.backlog + len(msg.items) > sup.app.max_queued:
            raise Backpressure(
                f"{len(sup.live) + self.backlog} tasks are queued, scheduled or running and this submit adds "
                f"{len(msg.items)}: over max_queued={sup.app.max_queued}; retry later or raise App(max_queued=...)"
            )
        self.submit(
            PendingSubmit(ident, msg.req, len(msg.items), push=msg.push, journaled=msg.journaled), msg.items, payload
        )

    def submit(self, pending: PendingSubmit, items: list[list[Any]], payload: Frames) -> None:
        """Record unlocked items now; send locked ones to their owners for admission first."""
        sup = self.sup
        now = time.time()
        rows = []
        for i, ((task_id, name, lock_key, sid, sowner, run_at), frame) in enumerate(zip(items, payload)):
            state = "SCHEDULED" if run_at and run_at > now else "QUEUED"
            row = (task_id, name, state, lock_key, sid, sowner, frame, now, run_at)
            pending.results[i] = [task_id, False, False]
            if lock_key is None or task_id in sup.live or sup.store.exists(task_id):
                rows.append(row)  # unlocked, or a resent submit that is already recorded
                continue
            pending.remaining += 1
            sup.keys.admissions[task_id] = (pending, i, row)
            sup.keys.admit([task_id, lock_key, sup.app.tasks[name].on_conflict])
        self.record(rows, None, False)
        if not pending.remaining:
            self.complete(pending)

    def replay_journals(self) -> None:
        """Record what clients that died left in their submit journals (``journal.py``), through
        the same validation as a Submit; ids already recorded are ignored. Runs every second."""
        sup = self.sup
        replayed: list[tuple[Path, str | None]] = []
        unreadable: list[tuple[Path, str | None]] = []
        for path, records, problem in journal.orphaned(sup.state_dir):
            for frames in records:
                try:
                    msg = messages.decode(frames[0])
                    if not isinstance(msg, messages.Submit):
                        raise ProtocolError(f"{type(msg).__name__} is not a submit")
                    self.on_submit(b"", msg, frames[1:])
                except ProtocolError as exc:  # not a record this version can read
                    problem = problem or f"a record in it does not decode: {exc}"
                except CapsuleError as exc:  # readable, refused (say, its task is gone from the app)
                    log.warning("a submit in journal %s was not recorded: %s", path.name, exc)
            (unreadable if problem else replayed).append((path, problem))
        if replayed or unreadable:
            sup.commit()  # recorded before the journals go
            sup.store.begin()
            for path, _ in replayed:
                path.unlink(missing_ok=True)
            for path, problem in unreadable:
                log.error(
                    "journal %s cannot be replayed whole (%s); its readable submits are recorded and the "
                    "file is kept as %s: to replay it, rename it back and start the capsule_actors version "
                    "that wrote it (%s)",
                    path.name,
                    problem,
                    journal.set_aside(path).name,
                    messages.version_hint(),
                )
        sup.add_timer(JOURNAL_SWEEP, self.replay_journals)

    def complete(self, pending: PendingSubmit) -> None:
        """Every item is decided: acknowledge the client, or record the schedule's fired slot."""
        sup = self.sup
        if pending.fire is not None:
            sup.store.set_last_slot(*pending.fire)
            return
        if not pending.ident:  # replayed from a journal whose writer is gone: nobody to answer
            return
        for i, result in enumerate(pending.results):
            assert result is not None
            push_req = pending.push[i] if pending.push else None
            task = sup.live.get(result[0])
            if push_req is not None and task is not None and not result[2]:  # as if Wait(push_req, id) came now
                task.waiters.append((pending.ident, push_req))
                sup.requests.waiter_index[(pending.ident, push_req)] = task.id
                result.append(True)
            else:  # rejected, or in the store only (backlog, delayed): nothing kept in RAM for it
                result.append(False)
        room = max(0, sup.app.max_queued - len(sup.live) - self.backlog)
        sup.reply(
            pending.ident,
            pending.req,
            True,
            {"items": pending.results, "room": room},
            outbox=sup.after_commit if pending.journaled else sup.outbox,
        )

    def record(self, rows: list[tuple[Any, ...]], slot: str | None, blocked: bool) -> None:
        sup = self.sup
        by_id = {r[0]: r for r in rows}
        for task_id, rowid in sup.store.insert_tasks(rows):
            row = by_id[task_id]
            if row[2] == "SCHEDULED" and row[3] is None:
                sup.wake_clock = True  # unlocked delayed tasks stay in SQLite until the clock says
                continue
            if row[3] is None and self.to_backlog(rowid):
                continue
            task = LiveTask(
                task_id, row[1], row[2], 0, row[3], row[4], row[5], owner=slot, blocked=blocked, run_at=row[8]
            )
            sup.live[task_id] = task
            if not blocked:
                sup.queue(task, row[8])

    def to_backlog(self, rowid: int) -> bool:
        """Leave a new unlocked QUEUED task in the store only when the in-memory queue is full
        (or a backlog is already waiting: submit order is kept). True when it was left there."""
        sup = self.sup
        if not self.backlog and len(sup.ready[ROLE_WORKER]) + len(sup.ready[ROLE_PROCESS]) < QUEUE_WINDOW:
            return False
        if not self.backlog:
            self.backlog_after = rowid - 1
        self.backlog += 1
        return True

    def page_in(self) -> None:
        """Load the oldest backlog tasks once the in-memory queue is half empty."""
        sup = self.sup
        queued = len(sup.ready[ROLE_WORKER]) + len(sup.ready[ROLE_PROCESS])
        if not self.backlog or queued > QUEUE_WINDOW // 2:
            return
        limit = QUEUE_WINDOW - queued
        rows = sup.store.backlog_rows(self.backlog_after, limit)
        for row in rows:
            self.backlog_after = row["rowid"]
            if row["id"] in sup.live:  # e.g. a delayed task that came due: it is already here
                continue
            self.backlog -= 1
            self.load(row, "QUEUED")
            sup.due(row["id"])
        if len(rows) < limit:
            self.backlog = 0

    def load(self, row: Any, state: str) -> LiveTask:
        task = LiveTask(
            row["id"],
            row["name"],
            state,
            row["attempts"],
            None,
            row["session_id"],
            row["session_owner"],
            run_at=row["run_at"],
        )
        task.waiters = self.sup.requests.parked.pop(task.id, [])
        self.sup.live[task.id] = task
        return task

    def load_stored(self, task_id: str) -> LiveTask | None:
        """Bring an unlocked task held only in the store (SCHEDULED, or QUEUED in the backlog)
        into memory: it is due or being cancelled. The waits parked on it come along."""
        sup = self.sup
        if task_id in sup.live:
            return sup.live[task_id]
        row = sup.store.live_row(task_id)
        if row is None or row["state"] not in ("SCHEDULED", "QUEUED") or row["lock_key"] is not None:
            return None
        if row["state"] == "QUEUED":
            self.backlog -= 1
        return self.load(row, row["state"])

    def on_fire(self, msg: messages.Fire) -> None:
        """A schedule's slot came: submit its task as the owner session (joining a run that is
        still going), and record the slot in the same transaction as that outcome."""
        sup = self.sup
        spec = sup.app.schedules.get(msg.name)
        last = sup.store.last_slot(msg.name)
        if spec is None or (last is not None and msg.slot <= last):
            return  # already handled: a restarted clock never fires a slot twice
        task = sup.app.tasks[msg.name]
        owner = sup.app.owner
        item = [new_task_id(), task.name, task.lock_key((), {}), owner.id, owner.owner, None]
        self.submit(PendingSubmit(b"", 0, 1, fire=(msg.name, msg.slot)), [item], [NO_ARGS])

    def on_due(self, msg: messages.Due) -> None:
        sup = self.sup
        for task_id in msg.task_ids:
            task = sup.live.get(task_id) or self.load_stored(task_id)
            if task is not None and task.state == "SCHEDULED":
                sup.store.requeue(task.id, task.session_id, None, None)
                task.state = "QUEUED"
                sup.due(task.id)
