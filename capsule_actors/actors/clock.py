"""The clock actor: fires cron schedules and delayed tasks by sending messages to the supervisor.

It runs no user code. Its step is the pure ``schedules.step(state, now)``; only this outer loop
reads the real clock, and it sleeps until the next deadline (the nearest cron slot or scheduled
task) or until the supervisor wakes it -- there is no polling loop. Delayed tasks stay in the
store: the clock reads only the next due ones, through a read-only ``StoreReader``.

Exactly once: the supervisor records a schedule's slot in the same transaction as the task the
slot submits (or joins), and ignores a slot at or before the recorded one. A clock that dies
between sending ``Fire`` and the commit resumes from the recorded slot and fires it again, once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .. import messages, store
from ..errors import StoreUnavailable
from ..schedules import ScheduleState, resume_state, seconds_until, step

log = logging.getLogger("capsule_actors.clock")

DUE_BATCH = 500  # scheduled tasks handed over per message
RESEND_AFTER = 5.0  # a Due the supervisor has not acted on is sent again after this long
MAX_SLEEP = 60.0  # re-read the store at least this often (belt and braces)
HEARTBEAT_INTERVAL = 1.0
STORE_RETRY = 1.0  # seconds before the clock reads a store again that was away


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


class ClockActor:
    def __init__(self, app: Any, sock: zmq.asyncio.Socket, config: dict[str, Any]) -> None:
        self.sock = sock
        now = dt.datetime.now(dt.UTC)
        marks = config.get("schedules", {})
        self.states: dict[str, ScheduleState] = {}
        for name, spec in app.schedules.items():
            mark = marks.get(name) or {}
            base = mark.get("last_slot") or mark.get("registered_at") or now.timestamp()
            self.states[name] = resume_state(spec, _utc(base), now)
        reader = store.open_reader(Path(config["state_dir"]), config.get("store"), app.name)  # made before us
        assert reader is not None
        self.store = reader
        self.sent: dict[str, float] = {}
        self.stopping = False

    def tick(self, now: dt.datetime) -> float:
        """Fire what is due at ``now``; return the seconds until the next deadline."""
        for name, state in list(self.states.items()):
            slots, self.states[name] = step(state, now)
            for slot in slots:
                self.sock.send_multipart([messages.Fire(name, slot.timestamp()).encode()])
        wait = min((seconds_until(s, now) for s in self.states.values()), default=MAX_SLEEP)
        return min(wait, self._due_tasks(now.timestamp()), MAX_SLEEP)

    def _due_tasks(self, now: float) -> float:
        due_now = self.store.due_scheduled(now, DUE_BATCH)
        mono = time.monotonic()
        self.sent = {k: v for k, v in self.sent.items() if mono - v < RESEND_AFTER}
        due = [task_id for task_id in due_now if task_id not in self.sent]
        if due:
            self.sock.send_multipart([messages.Due(due).encode()])
            self.sent.update(dict.fromkeys(due, mono))
        if len(due_now) == DUE_BATCH:
            return 0.0
        # the next one not due yet; handed-over ones are looked at again if not taken in time
        next_at = self.store.next_scheduled_after(now)
        wait = max(0.0, next_at - now) if next_at is not None else MAX_SLEEP
        return min(wait, RESEND_AFTER) if due_now else wait

    async def _heartbeat(self) -> None:
        while True:  # liveness for the supervisor, not a poll: the clock's work waits on deadlines
            self.sock.send_multipart([messages.Heartbeat(0).encode()])
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def serve(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        while not self.stopping:
            try:
                with self.store.snapshot():  # one consistent view per tick
                    wait = self.tick(dt.datetime.now(dt.UTC))
            except StoreUnavailable as exc:  # a store server that is away: the slots wait for it
                log.warning("%s; the clock looks again in %.0f s", exc, STORE_RETRY)
                wait = STORE_RETRY
            if await self.sock.poll(wait * 1000 + 1):
                while await self.sock.poll(0):
                    msg = messages.decode((await self.sock.recv_multipart())[0])
                    if isinstance(msg, messages.Stop):
                        self.stopping = True
        heartbeat.cancel()
        self.store.close()
