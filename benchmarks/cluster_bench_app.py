"""The app every member of ``cluster.py``'s clusters runs: ``cluster_bench_app:app``.

Each member is started with ``CLUSTER_MEMBER=<its name>`` in its environment (its actors inherit
it), so a task knows which member runs it. ``make_app(state_dir)`` builds the same App bound to
one member's state directory: the benchmark process submits through (and reads from) that member.

- ``noop(x)``: unlocked, returns the member that ran it.
- ``locked_noop(key, x)``: the same under lock ``k:{key}``, ``on_conflict="queue"`` (every
  submit runs, one at a time per key, on the member holding the key's shard).
- ``hold(key, log, stop, limit)``: the failover task. Locked on ``fo:{key}``, retried at once
  (no backoff) up to 3 times. Each attempt appends ``start,<member>,<key>,<time.time()>`` to
  ``log`` (one O_APPEND write), then runs until the file ``stop`` exists (or ``limit`` seconds).
"""

from __future__ import annotations

import os
import time

import capsule_actors as cpsl

MEMBER_ENV = "CLUSTER_MEMBER"
NO_BACKOFF = cpsl.Backoff(initial=0.0, factor=1.0, max=0.0, jitter=False)


def member() -> str:
    return os.environ.get(MEMBER_ENV, "?")


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def make_app(state_dir: str | os.PathLike[str] | None = None) -> cpsl.App:
    app = cpsl.App("bench-cluster", state_dir=state_dir, grace=2.0)

    @app.task
    async def noop(x: int) -> str:
        return member()

    @app.task(lock="k:{key}", on_conflict="queue")
    async def locked_noop(key: str, x: int) -> str:
        return member()

    @app.task(lock="fo:{key}", on_conflict="queue", retries=3, backoff=NO_BACKOFF)
    def hold(key: str, log: str, stop: str, limit: float) -> str:
        append_line(log, f"start,{member()},{key},{time.time():.6f}")
        end = time.monotonic() + limit
        while not os.path.exists(stop) and time.monotonic() < end:
            time.sleep(0.01)
        return member()

    return app


app = make_app()
