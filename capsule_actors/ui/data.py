"""What the task board shows: its columns, one task's detail view, and the live feed that tells
open pages what changed. Read by ``board.py`` (which starts the feed) and ``routes.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import messages, store
from ..bootstrap import ClientConfig
from ..errors import CapsuleError, NotRunning
from ..flows import FLOW_TASK
from ..states import ALL, QUEUED, RUNNING, SCHEDULED
from ..transport import read_runtime_file

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger("capsule_actors.board")

COLUMNS = tuple(state.value for state in ALL)
_DETAIL_EVENTS = 200


def detail(reader: store.StoreReader, task_id: str) -> dict[str, Any] | None:
    """One task for the detail view: its record, traceback and last events, the sizes of its
    pickled arguments and result (never their contents), and its last progress message."""
    out = reader.task_detail(task_id, _DETAIL_EVENTS)
    if out is None:
        return None
    out["message"] = next(
        (
            e["data"].get("message")
            for e in reversed(out["events"])
            if e["kind"] == "progress" and isinstance(e["data"], dict)
        ),
        None,
    )
    out["args"] = {
        "bytes": out.pop("args_bytes") or 0,
        "format": "cloudpickle",
        "summary": "pickled arguments (not unpickled by the board)",
    }
    if out["name"] == FLOW_TASK:  # a workflow opens into its steps (state per step)
        out["flow"] = flow = reader.flow_steps(task_id)
        if flow is not None:
            value = flow.get("value")
            shape = (flow.get("inputs") or {}).get(value) if isinstance(value, str) else None
            flow["kind"] = store.flow_kind(_json_type(value), _json_type(shape))
        if out["state"] in (QUEUED, SCHEDULED):  # it runs until its record ends (FlowHandle.status)
            out["record_state"], out["state"] = out["state"], RUNNING.value
    result_bytes = out.pop("result_bytes")
    out["result"] = None if not result_bytes else {"bytes": result_bytes, "format": "cloudpickle"}
    return out


def _json_type(value: Any) -> str | None:
    """The JSON type name of a workflow spec (``store.flow_kind`` takes SQL's names)."""
    return "array" if isinstance(value, list) else "text" if isinstance(value, str) else None


# ---- the live feed ---------------------------------------------------------------------------


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Feed:
    """One ``AllEvents`` long poll on the supervisor, fanned out to every open page."""

    def __init__(self, state_dir: Path, after: int) -> None:
        self.state_dir = state_dir
        self.after = after
        self.online = False
        self.queues: set[asyncio.Queue[str]] = set()

    def subscribe(self) -> asyncio.Queue[str]:
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        self.queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[str]) -> None:
        self.queues.discard(q)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        msg = sse(event, data)
        for q in list(self.queues):
            if q.full():  # a slow page: drop its oldest message (each one just says "refresh")
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(msg)

    def connection(self) -> Client | None:
        """The supervisor's client, or None when no supervisor runs for the state dir."""
        from ..client import Client

        if read_runtime_file(self.state_dir) is None:
            return None
        try:
            return Client.shared(ClientConfig(self.state_dir))
        except NotRunning:
            return None

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                conn = await asyncio.to_thread(self.connection)
                if conn is None:
                    await asyncio.sleep(1.0)
                    continue
                try:
                    body, _ = await conn.acall(lambda req: messages.AllEvents(req, self.after))
                except CapsuleError as exc:
                    log.debug("board feed: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                events = body.get("events") or []
                if events:
                    self.after = max(self.after, int(events[-1]["seq"]))
                    ids = sorted({e["task_id"] for e in events})
                    self.publish("tasks", {"seq": self.after, "n": len(events), "ids": ids[:500]})
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        """Tell the pages when the supervisor comes and goes."""
        while True:
            conn = await asyncio.to_thread(self.connection)
            online = conn is not None and conn.connected
            if online != self.online:
                self.online = online
                self.publish("status", {"online": online})
            await asyncio.sleep(0.25)
