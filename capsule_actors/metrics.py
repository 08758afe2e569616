"""``/metrics`` in the Prometheus text format (``run --metrics``, ``App(metrics=...)``).

prometheus_client (the ``capsule_actors[metrics]`` extra) renders and serves it from its own
HTTP thread. What it renders is the last ``MetricsView`` the supervisor's loop published (a
frozen copy of plain counters, once a second): a scrape reads that view and the actors' RSS from
``/proc``, and never waits for nor takes time from the loop. This module is imported only when
metrics are asked for, and prometheus_client only when the server starts.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .supervisor.tally import Histogram, MetricsView

DEFAULT_HOST = "127.0.0.1"
PREFIX = "capsule"

# name -> help, for the counters of tasks by task name (capsule_tasks_<event>_total)
EVENT_HELP = {
    "submitted": "Tasks recorded (submits, schedule firings, fan-out), by task name.",
    "started": "Attempts started on an actor (retries included), by task name.",
    "succeeded": "Tasks that ended SUCCEEDED, by task name.",
    "failed": "Tasks that ended FAILED (retries spent or not retryable), by task name.",
    "retried": "Attempts that failed and were queued again for a retry, by task name.",
    "cancelled": "Tasks that ended CANCELLED, by task name.",
    "timed_out": "Attempts that ran past the task's timeout, by task name.",
    "crashed": "Attempts whose actor process died under them (WorkerCrashed), by task name.",
}


def parse_address(value: str | int) -> tuple[str, int]:
    """``PORT``, ``:PORT`` (both on 127.0.0.1) or ``HOST:PORT`` (``[::1]:PORT`` for IPv6): another
    interface than loopback is only ever the one named."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535 or not _valid_host(host):
        raise ConfigError(
            f"metrics={value!r}: expected PORT or HOST:PORT, e.g. 9464 or 127.0.0.1:9464 (0.0.0.0:9464 "
            "to listen on every interface)"
        )
    return host, port


def normalize_address(value: str | int) -> str:
    """The checked address as ``HOST:PORT`` (what ``App.metrics`` and the supervisor keep)."""
    host, port = parse_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _valid_host(host: str) -> bool:
    """An IP address, or a host name of letters, digits and hyphens between dots."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host))


_HOST_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def require_client() -> None:
    """Fail early, naming the extra, when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "metrics need prometheus_client: pip install 'capsule_actors[metrics]' (or prometheus-client)"
        ) from None


class MetricsServer:
    """Serves ``/metrics`` on a thread of its own, from the view ``read_view`` returns."""

    def __init__(self, host: str, port: int, read_view: Callable[[], MetricsView | None]) -> None:
        self.host, self.port = host, port
        self._read_view = read_view
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen; return the port (the one the system chose when ``port`` was 0)."""
        require_client()
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ViewCollector(self._read_view))
        try:
            self._server, self._thread = start_http_server(self.port, self.host, registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; choose another port "
                "(--metrics HOST:PORT or App(metrics=...))"
            ) from None
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class _ViewCollector:
    """A prometheus_client collector over the last published view (read on the server's thread)."""

    def __init__(self, read_view: Callable[[], MetricsView | None]) -> None:
        self._read_view = read_view

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self._read_view()
        if view is None:  # the loop has not published yet
            return
        for event, help_text in EVENT_HELP.items():
            family = CounterMetricFamily(f"{PREFIX}_tasks_{event}", help_text, labels=["task"])
            for name, n in sorted(view.events.get(event, {}).items()):
                family.add_metric([name], n)
            yield family
        yield _histograms(f"{PREFIX}_task_queue_wait_seconds", _QUEUE_WAIT_HELP, view.queue_wait, "task")
        yield _histograms(f"{PREFIX}_task_run_seconds", _RUN_HELP, view.run_time, "task")
        yield _histograms(f"{PREFIX}_store_commit_seconds", _COMMIT_HELP, {"": view.commit_time}, None)
        for state, n in view.tasks.items():
            yield GaugeMetricFamily(f"{PREFIX}_tasks_{state}", f"Tasks {state.upper()} now.", value=n)
        yield GaugeMetricFamily(
            f"{PREFIX}_backlog_tasks", "Queued tasks held in the store only (past the in-memory window).", view.backlog
        )
        yield from _actor_families(view)
        yield GaugeMetricFamily(f"{PREFIX}_worker_nodes", "Worker nodes connected now.", value=view.nodes)


_QUEUE_WAIT_HELP = "Seconds from queued (or due, or retried) to the start of an attempt, by task name."
_RUN_HELP = "Seconds an attempt ran, from its start to its outcome in the supervisor, by task name."
_COMMIT_HELP = "Seconds the task store's commits took (one per loop turn with writes)."


def _histograms(name: str, help_text: str, by_label: Mapping[str, Histogram], label_name: str | None) -> Any:
    """One histogram family; ``label_name`` None: a single histogram (``by_label`` has one, keyed "")."""
    from prometheus_client.core import HistogramMetricFamily

    labels = [label_name] if label_name else []
    family = HistogramMetricFamily(name, help_text, labels=labels)
    for label, hist in sorted(by_label.items()):
        cumulative, buckets = 0, []
        for bound, n in zip([*hist.bounds, float("inf")], hist.buckets):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([label] if labels else [], buckets, hist.sum)
    return family


def _actor_families(view: MetricsView) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    from .supervisor.specs import local_rss

    by_state = GaugeMetricFamily(f"{PREFIX}_actors", "Actor slots by role and state.", labels=["role", "state"])
    counts: dict[tuple[str, str], int] = {}
    restarts: dict[str, int] = {}
    rss = GaugeMetricFamily(
        f"{PREFIX}_actor_rss_bytes", "Resident memory of each actor process.", labels=["slot", "role", "node"]
    )
    for actor in view.actors:
        counts[actor.role, actor.state] = counts.get((actor.role, actor.state), 0) + 1
        restarts[actor.role] = restarts.get(actor.role, 0) + actor.restarts
        value = actor.rss if actor.pid is None else local_rss(actor.pid)
        if value is not None:
            rss.add_metric([actor.slot, actor.role, actor.node], value)
    for (role, state), n in sorted(counts.items()):
        by_state.add_metric([role, state], n)
    yield by_state
    restart_family = GaugeMetricFamily(
        f"{PREFIX}_actor_restarts",
        "Actor restarts after a crash since the supervisor started, by role.",
        labels=["role"],
    )
    for role, n in sorted(restarts.items()):
        restart_family.add_metric([role], n)
    yield restart_family
    yield rss
