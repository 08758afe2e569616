"""The board's Stats view (``GET /api/stats``): throughput by outcome, queue depth and run-time
percentiles per task name, actor restarts and crashed attempts, over the last hour or day, assembled from the grouped
rows the store returns (``StoreReader.stats_rows``; the SQL lives in ``store/``)."""

from __future__ import annotations

import math
from typing import Any

from .. import store
from ..errors import ConfigError
from ..states import TERMINAL

# window -> (seconds, bucket seconds)
WINDOWS = {"hour": (3600.0, 60.0), "day": (86400.0, 900.0)}
RUN_TIME_SAMPLE = 20_000  # the newest finished tasks whose run times make the percentiles


def stats(reader: store.StoreReader, window: str, now: float) -> dict[str, Any]:
    """The view's data: each series has one value per bucket (oldest first)."""
    if window not in WINDOWS:
        raise ConfigError(f"window={window!r}: expected one of {', '.join(WINDOWS)}")
    span, step = WINDOWS[window]
    n = int(span // step)
    since = now - span
    rows = reader.stats_rows(since, step, RUN_TIME_SAMPLE)

    def at(b: int) -> int:
        return min(max(int(b), 0), n - 1)

    throughput = {str(state): [0.0] * n for state in TERMINAL}
    for b, state, count in rows.finished:
        if state in throughput:
            throughput[state][at(b)] += count / step
    crashes, restarts = [0] * n, [0] * n
    for series, grouped in ((crashes, rows.crashes), (restarts, rows.restarts)):
        for b, count in grouped:
            series[at(b)] += count
    return {
        "window": window,
        "since": since,
        "step": step,
        "now": now,
        "buckets": [since + i * step for i in range(n)],
        "throughput": throughput,
        "queue": _queue_depth(rows, n, at),
        "run_time": _run_time(rows.run_times),
        "crashes": crashes,
        "restarts": restarts,
    }


def _queue_depth(rows: store.StatsRows, n: int, at: Any) -> dict[str, list[int]]:
    """Tasks queued at the end of each bucket (the last one ends now), per task name: those queued at the start of the
    window, plus the ones that joined, less the ones that left (never below zero)."""
    change: dict[str, list[int]] = {}
    for sign, grouped in ((1, rows.arrivals), (-1, rows.departures)):
        for b, name, count in grouped:
            change.setdefault(name, [0] * n)[at(b)] += sign * count
    before = dict(rows.queued_before)
    out = {}
    for name in sorted(set(change) | set(before)):
        depth, series = before.get(name, 0), []
        for delta in change.get(name, [0] * n):
            depth = max(0, depth + delta)
            series.append(depth)
        out[name] = series
    return out


def _run_time(run_times: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """p50 and p99 (nearest rank) of each task name's run times, slowest p99 first."""
    by_name: dict[str, list[float]] = {}
    for name, seconds in run_times:
        by_name.setdefault(name, []).append(max(0.0, float(seconds)))
    out = []
    for name, values in by_name.items():
        values.sort()
        out.append({"name": name, "p50": _rank(values, 0.50), "p99": _rank(values, 0.99), "n": len(values)})
    return sorted(out, key=lambda r: (-r["p99"], r["name"]))


def _rank(values: list[float], q: float) -> float:
    return values[max(0, math.ceil(q * len(values)) - 1)]
