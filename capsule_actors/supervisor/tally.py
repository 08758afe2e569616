"""What the loop counts for ``/metrics``: plain ints and lists updated where things happen, and a
frozen ``MetricsView`` the loop publishes once a second for the scrape thread to read.

The loop never touches prometheus_client: an event costs a dict lookup and an int increment, a
duration one ``bisect`` more. Rendering happens on the metrics server's thread
(``capsule_actors.metrics``), from the last published view, so a scrape takes nothing from the
loop. Labels are task names and roles (bounded by the registry and the slots), never ids or keys.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping

# The counters of tasks, by task name: the name in /metrics is capsule_tasks_<event>_total.
EVENTS = ("submitted", "started", "succeeded", "failed", "retried", "cancelled", "timed_out", "crashed")

# Upper bounds (seconds) of the histogram buckets; +Inf is implied.
TASK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def copy(self) -> Histogram:
        other = Histogram(self.bounds)
        other.buckets = list(self.buckets)
        other.count, other.sum = self.count, self.sum
        return other


def _ignore(*args: object) -> None:
    """What a disabled tally does with an event."""


class TaskTally:
    """The loop's counters; ``Intake`` and ``Attempts`` write them, ``StatusReport`` copies them."""

    def __init__(self, enabled: bool = True) -> None:
        self.events: dict[str, dict[str, int]] = {event: {} for event in EVENTS}
        self.queue_wait: dict[str, Histogram] = {}
        self.run_time: dict[str, Histogram] = {}
        self.commit_time = Histogram(COMMIT_BUCKETS)
        self.enabled = enabled
        if not enabled:  # nobody serves /metrics: the loop pays a call per event, not the bookkeeping
            self.count = self.started = self.ran = _ignore  # type: ignore[method-assign,assignment]

    def count(self, event: str, name: str, n: int = 1) -> None:
        by_name = self.events[event]
        by_name[name] = by_name.get(name, 0) + n

    def started(self, name: str, waited: float) -> None:
        """An attempt started after ``waited`` seconds in the queue (one call: it is per task)."""
        by_name = self.events["started"]
        by_name[name] = by_name.get(name, 0) + 1
        hist = self.queue_wait.get(name)
        if hist is None:
            hist = self.queue_wait[name] = Histogram(TASK_BUCKETS)
        hist.buckets[bisect.bisect_left(TASK_BUCKETS, waited)] += 1
        hist.count += 1
        hist.sum += waited

    def ran(self, name: str, seconds: float) -> None:
        hist = self.run_time.get(name)
        if hist is None:
            hist = self.run_time[name] = Histogram(TASK_BUCKETS)
        hist.buckets[bisect.bisect_left(TASK_BUCKETS, seconds)] += 1
        hist.count += 1
        hist.sum += seconds


@dataclasses.dataclass(frozen=True)
class ActorGauge:
    """One slot as /metrics shows it; ``pid`` is read by the scrape thread for the RSS of a local
    actor (never a label), ``rss`` is what a worker node reported for its actor."""

    slot: str
    role: str
    node: str
    state: str
    restarts: int
    pid: int | None
    rss: int | None


@dataclasses.dataclass(frozen=True)
class MetricsView:
    """A copy of the loop's counters and gauges at one instant (published, then only read)."""

    events: Mapping[str, Mapping[str, int]]
    queue_wait: Mapping[str, Histogram]
    run_time: Mapping[str, Histogram]
    commit_time: Histogram
    tasks: Mapping[str, int]  # queued, scheduled, running
    backlog: int
    actors: tuple[ActorGauge, ...]
    nodes: int

    @staticmethod
    def of(
        tally: TaskTally, tasks: Mapping[str, int], backlog: int, actors: tuple[ActorGauge, ...], nodes: int
    ) -> MetricsView:
        return MetricsView(
            events={event: dict(by_name) for event, by_name in tally.events.items()},
            queue_wait={name: h.copy() for name, h in tally.queue_wait.items()},
            run_time={name: h.copy() for name, h in tally.run_time.items()},
            commit_time=tally.commit_time.copy(),
            tasks=tasks,
            backlog=backlog,
            actors=actors,
            nodes=nodes,
        )
