"""Sessions on the supervisor's side: the events a running attempt emits (reply, notify, stream,
progress, task cards), task cards shown from app code (``ShowCard``), and ``session.db``, whose
every read and write comes here, so the store has one writer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import messages
from ..errors import ProtocolError, UnknownTask
from ..store.base import check_session_kv, session_kv

if TYPE_CHECKING:
    from ..app import App
    from ..store import TaskStore
    from .outbox import Frames, Outbox
    from .specs import ActorProcess
    from .tasks import TaskTable


class Sessions:
    """Emits from actors and SessionKV requests from clients, both written in the turn's
    transaction (so their effects are durable before anything is answered)."""

    def __init__(self, app: App, store: TaskStore, tasks: TaskTable, outbox: Outbox) -> None:
        self._app = app
        self._store = store
        self._tasks = tasks
        self._outbox = outbox

    def on_emit(self, proc: ActorProcess, msg: messages.Emit, payload: Frames) -> None:
        """A running attempt's session event: record it (in order) unless the attempt is over."""
        task = self._tasks.get(msg.task_id)
        if task is None or proc.running.get(msg.task_id) != msg.attempt:
            return
        store = self._store
        if msg.kind == "card":  # session.show_task(h): follow that task's card from now on
            card_id = str(msg.data.get("card"))
            card = store.show_card(card_id, task.session_id or "")
            if card is not None and task.session_id is not None:
                store.add_event(card_id, task.session_id, "card", card)
            return
        if msg.kind == "progress" and isinstance(msg.data.get("fraction"), (int, float)):
            store.set_progress(task.id, float(msg.data["fraction"]))  # before: cards show it
        try:
            store.add_event(task.id, task.session_id, msg.kind, msg.data)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"Emit data is not JSON: {exc}") from None

    def on_show_card(self, ident: bytes, msg: messages.ShowCard, payload: Frames) -> None:
        """``session.show_task(h)`` from app code: like a task's ``card`` emit, for any session."""
        card = self._store.show_card(msg.task_id, msg.session_id)
        if card is None:
            raise UnknownTask(f"session {msg.session_id!r} cannot show task {msg.task_id!r}: no such task")
        self._store.add_event(msg.task_id, msg.session_id, "card", card)
        self._outbox.reply(ident, msg.req, True, True)

    def on_session_kv(self, ident: bytes, msg: messages.SessionKV, payload: Frames) -> None:
        """One ``session.db`` operation (``messages.SessionKV`` says what each answers)."""
        check_session_kv(msg, self._app.max_payload_bytes)
        self._outbox.reply(ident, msg.req, True, session_kv(self._store, msg))
