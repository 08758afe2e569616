"""The observability switches of ``run_all.py``: ``--metrics`` and ``--otel`` run capsule_actors'
rows again with ``/metrics`` served (and scraped once a second, as Prometheus would, only faster)
or with an OpenTelemetry SDK recording a span per attempt (and the submits inside a span), so
the table shows what each costs next to the rows without it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import capsule_actors as cpsl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_tracing() -> None:
    """An SDK that records every span and exports it to nowhere (the batch processor's work is
    paid, the network is not): in the benchmark process and, through App(on_actor_start=), in
    every actor."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)


@contextlib.contextmanager
def observed(apps: list[cpsl.App], metrics: bool = False, otel: bool = False) -> Iterator[str]:
    """The runtimes that ``apps`` start inside the block serve /metrics (scraped every second)
    or trace; yields the row label's suffix."""
    saved = [(app.metrics, app.on_actor_start) for app in apps]
    stop = threading.Event()
    scrapers = []
    span: Any = contextlib.nullcontext()
    try:
        for app in apps:
            if metrics:
                app.metrics = f"127.0.0.1:{_free_port()}"
                scrapers.append(threading.Thread(target=_scrape, args=(app.metrics, stop), daemon=True))
            if otel:
                app.on_actor_start = setup_tracing
        if otel:
            from opentelemetry import trace

            setup_tracing()
            span = trace.get_tracer("benchmark").start_as_current_span("benchmark")
        for thread in scrapers:
            thread.start()
        with span:
            yield " [" + " + ".join(w for w, on in (("metrics", metrics), ("tracing", otel)) if on) + "]"
    finally:
        stop.set()
        for thread in scrapers:
            thread.join(timeout=5)
        for app, (address, hook) in zip(apps, saved):
            app.metrics, app.on_actor_start = address, hook


def _scrape(address: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):  # the runtime is between two variants
            urllib.request.urlopen(f"http://{address}/metrics", timeout=2).read()
