"""OpenTelemetry traces, when the app uses them: a submit made inside a span carries that span's
W3C ``traceparent`` in its header item, and each attempt runs inside a span that is its child.

Nothing here imports OpenTelemetry: it is used only when the app has imported it already
(``opentelemetry.trace`` in ``sys.modules``, which configuring an SDK does), so an app without
it pays one dict lookup per submit and per attempt. The work itself is in ``_otel.py``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._otel import AttemptSpan
    from .messages import Done, Run


def active() -> bool:
    """True when this process's app has imported OpenTelemetry."""
    return "opentelemetry.trace" in sys.modules


def traceparent() -> str | None:
    """The W3C traceparent of the caller's active span, or None (no span, or no OpenTelemetry)."""
    if not active():
        return None
    from . import _otel

    return _otel.current_traceparent()


def start_attempt(run: Run, actor: str) -> AttemptSpan | None:
    """The span of one attempt, child of the submitter's span (``run.trace``) and linked to the
    attempt before it (``run.link``); None without OpenTelemetry."""
    if not active():
        return None
    from . import _otel

    return _otel.AttemptSpan(run, actor)


def end_attempt(span: AttemptSpan | None, done: Done) -> Done:
    """End the attempt's span with its outcome; the Done carries the span's context back, so a
    retry links to it."""
    if span is None:
        return done
    return span.end(done)


def cut_attempt(span: AttemptSpan | None) -> None:
    """End the span of an attempt cut short without an outcome of its own (given back at a stop)."""
    if span is not None:
        span.span.end()
