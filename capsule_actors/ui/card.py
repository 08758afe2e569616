"""TaskCard: one task rendered as text (terminals, logs) and as HTML (notebooks, chat UIs, the board).

A card is a snapshot. Build it from a handle (``TaskCard(h)`` reads ``h.info()``, and the result
of a task that succeeded), from a :class:`~capsule_actors.TaskInfo`, from a card event that
``session.show_task(h)`` produced (``TaskCard(event)`` or ``TaskCard(event.data)``), or from a
task record dict. ``card.updated(event)`` applies a later card update (same card id).

Nothing here imports the web stack, and nothing here unpickles anything except a handle's own
result, which the app process that holds the handle could read anyway.
"""

from __future__ import annotations

import dataclasses
import html as _html
import re
import time
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from ..handle import TaskEvent, TaskHandle, TaskInfo
from ..ids import short_id
from ..states import TaskState

__all__ = ["TaskCard", "card_css", "format_duration", "progress_bar"]

_RESULT_CHARS = 120
_BAR_WIDTH = 20
# the mark an actor leaves where it cut an error text to fit its message (actors/worker.py CUT_MARK)
_CUT = re.compile(r"\[capsule_actors: ([0-9][0-9,]*) characters cut\]")


@lru_cache(maxsize=1)
def card_css() -> str:
    """The stylesheet of ``TaskCard.html()`` (also used by the task board)."""
    return resources.files(__package__).joinpath("static/card.css").read_text(encoding="utf-8")


def format_duration(seconds: float | None) -> str:
    """``0.4s``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def progress_bar(fraction: float | None, width: int = _BAR_WIDTH, unicode: bool = False) -> str:
    """``[#########-----------]`` (or ``█░`` with ``unicode``); an unknown fraction is empty."""
    full, empty = ("█", "░") if unicode else ("#", "-")
    n = 0 if fraction is None else max(0, min(width, round(float(fraction) * width)))
    return "[" + full * n + empty * (width - n) + "]"


def _cut_chars(text: str | None) -> int:
    """How many characters the actor cut from an error text, as its marks say (0: none)."""
    return sum(int(m.group(1).replace(",", "")) for m in _CUT.finditer(text or ""))


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclasses.dataclass(frozen=True)
class _Fields:
    id: str
    name: str
    state: TaskState
    attempts: int = 0
    progress: float | None = None
    message: str | None = None
    error: str | None = None
    result: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lock_key: str | None = None
    session_id: str | None = None
    waiting_for: str | None = None  # "rate limited until …" (TaskInfo.waiting_for)


class TaskCard:
    """A task card: ``str(card)`` / ``card.text()`` for terminals and logs, ``card.html()`` for
    browsers (``_repr_html_`` makes it show in Jupyter), ``card.to_dict()`` for JSON."""

    __slots__ = ("_f",)

    def __init__(self, source: TaskHandle | TaskInfo | TaskEvent | Mapping[str, Any], *, result: bool = True) -> None:
        """``source``: a TaskHandle (its ``info()`` is read now; with ``result`` the value of a
        task that succeeded is summarized), a TaskInfo, a card TaskEvent, or a card / record dict."""
        if isinstance(source, TaskHandle):
            info = source.info()
            fields = self._from_info(info)
            if result and info.state is TaskState.SUCCEEDED:
                fields = dataclasses.replace(fields, result=_result_summary(source))
        elif isinstance(source, TaskInfo):
            fields = self._from_info(source)
        elif isinstance(source, TaskEvent):
            fields = self._from_mapping({"task_id": source.task_id, **source.data})
        elif isinstance(source, Mapping):
            fields = self._from_mapping(source)
        else:
            raise TypeError(
                f"TaskCard needs a TaskHandle, TaskInfo, card TaskEvent or dict, not {type(source).__name__}"
            )
        self._f = fields

    # ---- building ----------------------------------------------------------------------------
    @staticmethod
    def _from_info(info: TaskInfo) -> _Fields:
        error = f"{info.error[0]}: {info.error[1]}" if info.error else None
        return _Fields(
            id=info.id,
            name=info.name,
            state=info.state,
            attempts=info.attempts,
            progress=info.progress,
            error=error,
            created_at=info.created_at,
            started_at=info.started_at,
            finished_at=info.finished_at,
            lock_key=info.lock_key,
            session_id=info.session_id,
            waiting_for=info.waiting_for,
        )

    @staticmethod
    def _from_mapping(data: Mapping[str, Any]) -> _Fields:
        task_id = data.get("task_id") or data.get("card") or data.get("id")
        if not task_id:
            raise ValueError("a task card needs a task id (keys task_id, card or id)")
        state = data.get("state") or TaskState.QUEUED
        error = data.get("error")
        if error is None and data.get("error_type"):
            error = f"{data['error_type']}: {data.get('error_message') or ''}"
        progress = data.get("progress")
        return _Fields(
            id=str(task_id),
            name=str(data.get("name") or "?"),
            state=TaskState(state),
            attempts=int(data.get("attempts") or 0),
            progress=float(progress) if isinstance(progress, (int, float)) else None,
            message=data.get("message"),
            error=error,
            result=data.get("result"),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            lock_key=data.get("lock_key"),
            session_id=data.get("session_id"),
            waiting_for=data.get("waiting_for"),
        )

    def updated(self, update: TaskEvent | Mapping[str, Any]) -> TaskCard:
        """A new card with the fields of a later card update (or any partial mapping) applied."""
        data = dict(update.data) if isinstance(update, TaskEvent) else dict(update)
        merged = {**self.to_dict(), **{k: v for k, v in data.items() if k in _MERGE_KEYS}}
        card = TaskCard.__new__(TaskCard)
        card._f = self._from_mapping(merged)
        return card

    # ---- properties --------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The card id: the id of the task it shows."""
        return self._f.id

    @property
    def name(self) -> str:
        return self._f.name

    @property
    def state(self) -> TaskState:
        return self._f.state

    @property
    def attempts(self) -> int:
        return self._f.attempts

    @property
    def progress(self) -> float | None:
        """0.0-1.0 as last reported; 1.0 once the task succeeded."""
        if self._f.state is TaskState.SUCCEEDED:
            return 1.0
        return self._f.progress

    @property
    def error(self) -> str | None:
        return self._f.error

    @property
    def error_cut(self) -> int:
        """Characters cut from the error text to fit the actor's message (0 when it is whole);
        the exception ``result()`` raises still has them when it could be pickled."""
        return _cut_chars(self._f.error) if self._f.state is not TaskState.SUCCEEDED else 0

    def truncation_note(self) -> str | None:
        """The line that says the error text shown is not all of it."""
        cut = self.error_cut
        return f"error text truncated: {cut:,} characters cut" if cut else None

    @property
    def result(self) -> str | None:
        """A short repr of the result (only for cards built from the handle of a finished task)."""
        return self._f.result

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds running (until it finished, or until now); None before it started."""
        if self._f.started_at is None:
            return None
        end = self._f.finished_at if self._f.finished_at is not None else (now or time.time())
        return max(0.0, end - self._f.started_at)

    def waiting(self, now: float | None = None) -> float | None:
        """Seconds since it was submitted, for a task that has not started yet."""
        if self._f.started_at is not None or self._f.created_at is None or self._f.state.terminal:
            return None
        return max(0.0, (now or time.time()) - self._f.created_at)

    def summary(self) -> str | None:
        """The result or error line, if any."""
        if self._f.error and self._f.state is not TaskState.SUCCEEDED:
            return f"error: {self._f.error}"
        if self._f.result is not None:
            return f"result: {self._f.result}"
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self._f)
        d["state"] = self._f.state.value
        d["task_id"] = d["card"] = self._f.id
        return d

    # ---- rendering ---------------------------------------------------------------------------
    def _timing(self, now: float | None) -> str:
        elapsed = self.elapsed(now)
        if elapsed is not None:
            return f"elapsed {format_duration(elapsed)}"
        waiting = self.waiting(now)
        if waiting is None:
            return "not started"
        why = f", {self._f.waiting_for}" if self._f.waiting_for else ""
        return f"waiting {format_duration(waiting)}{why}"

    def text(self, *, now: float | None = None, unicode: bool = False, width: int = _BAR_WIDTH) -> str:
        """Three short lines (two without a result or error), plain text::

        build_report  RUNNING  attempt 1  id 3f2a9c1e
        [##########----------]  50%  rendering  elapsed 3.2s
        """
        f = self._f
        head = f"{f.name}  {f.state.value}  attempt {f.attempts}  id {short_id(f.id)}"
        pct = "  ?%" if self.progress is None else f"{round(self.progress * 100):3d}%"
        bar = f"{progress_bar(self.progress, width, unicode)} {pct}"
        if f.message:
            bar += f"  {_short(f.message, 60)}"
        bar += f"  {self._timing(now)}"
        lines = [head, bar]
        summary = self.summary()
        if summary:
            lines.append(_short(summary, 200))
        note = self.truncation_note()
        if note:
            lines.append(note)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<TaskCard {self._f.name} {self._f.id} {self._f.state.value}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskCard) and self._f == other._f

    def __hash__(self) -> int:
        return hash(self._f)

    def html(self, *, styles: bool = True, now: float | None = None) -> str:
        """One ``<div class="cpsl-card">``; with ``styles`` a ``<style>`` block comes first, so the
        fragment renders on its own. Every value is escaped."""
        f = self._f
        esc = _html.escape
        pct = None if self.progress is None else round(self.progress * 100)
        meta = [f"{pct}%"] if pct is not None else []
        meta += [
            self._timing(now),
            f"attempt {f.attempts}",
            f'<span class="cpsl-id" title="{esc(f.id)}">{esc(short_id(f.id))}</span>',
        ]
        if f.lock_key:
            meta.append(f"lock {esc(f.lock_key)}")
        now_attr = "" if pct is None else f' aria-valuenow="{pct}"'
        parts = [
            f'<div class="cpsl-card cpsl-{f.state.value}" data-card="{esc(f.id)}" data-state="{f.state.value}">',
            '<div class="cpsl-card-head">'
            f'<span class="cpsl-name" title="{esc(f.name)}">{esc(f.name)}</span>'
            f'<span class="cpsl-state">{f.state.value}</span></div>',
            f'<div class="cpsl-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"{now_attr}>'
            f'<div style="width:{pct or 0}%"></div></div>',
            '<div class="cpsl-meta">' + "".join(f"<span>{m}</span>" for m in meta) + "</div>",
        ]
        if f.message:
            parts.append(f'<div class="cpsl-meta">{esc(_short(f.message, 120))}</div>')
        summary = self.summary()
        if summary:
            cls = "cpsl-error" if summary.startswith("error") else "cpsl-result"
            parts.append(f'<div class="{cls}">{esc(_short(summary, 300))}</div>')
        note = self.truncation_note()
        if note:
            parts.append(f'<div class="cpsl-meta cpsl-truncated">{esc(note)}</div>')
        parts.append("</div>")
        body = "".join(parts)
        return f"<style>{card_css()}</style>{body}" if styles else body

    def _repr_html_(self) -> str:
        return self.html()


_MERGE_KEYS = {
    "name",
    "state",
    "attempts",
    "progress",
    "message",
    "error",
    "result",
    "created_at",
    "started_at",
    "finished_at",
    "lock_key",
    "session_id",
}


def _result_summary(handle: TaskHandle) -> str | None:
    try:
        value = handle.result(timeout=10)
    except Exception:
        return None
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return _short(text, _RESULT_CHARS)
