"""What ``tracing.py`` does once OpenTelemetry is there (this module imports it; nothing else
imports this module unless the app imported OpenTelemetry first)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from .messages import Done, Run

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "capsule_actors"


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def _span_context(traceparent: str) -> trace.SpanContext:
    return trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()


class AttemptSpan:
    """One attempt's span, current in the attempt's context (and so in a plain ``def`` task's
    thread, which runs in a copy of it) until ``end``."""

    def __init__(self, run: Run, actor: str) -> None:
        parent = _PROPAGATOR.extract({"traceparent": run.trace}) if run.trace else context.Context()
        links = []
        if run.link:
            linked = _span_context(run.link)
            if linked.is_valid:
                links.append(trace.Link(linked, {"capsule.link": "previous attempt"}))
        self.span = trace.get_tracer(_TRACER_NAME).start_span(
            f"run {run.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "capsule.task.name": run.name,
                "capsule.task.id": run.task_id,
                "capsule.attempt": run.attempt,
                "capsule.actor": actor,
            },
        )
        # current for the rest of the attempt: its asyncio task's context, which ends with it
        context.attach(trace.set_span_in_context(self.span))

    def end(self, done: Done) -> Done:
        span = self.span
        span.set_attribute("capsule.outcome", done.outcome)
        if done.outcome != "ok":
            attributes = {"exception.type": done.error_type, "exception.message": done.error_message}
            if done.traceback:
                attributes["exception.stacktrace"] = done.traceback
            span.add_event("exception", attributes)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{done.error_type}: {done.error_message}"))
        span.end()
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        return dataclasses.replace(done, trace=carrier.get("traceparent"))
