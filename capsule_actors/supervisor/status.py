"""The status snapshot (``capsule-actors status``, ``Runtime.status()``, the board): read from
the parts that own each piece, never from the store's task table (no scan per request)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from .. import messages
from ..states import QUEUED, RUNNING, SCHEDULED
from .specs import ActorProcess, ChildSpec, SlotRecord, local_rss
from .tally import ActorGauge, MetricsView, TaskTally

if TYPE_CHECKING:
    from ..store import TaskStore
    from .attempts import Attempts
    from .children import Children
    from .cluster import Membership
    from .intake import Intake
    from .node_table import NodeTable
    from .retention import Retention
    from .tasks import TaskTable


def actor_status(
    proc: ActorProcess | None, spec: ChildSpec, record: SlotRecord, keys: int = 0, rss: int | None = None
) -> messages.ActorStatus:
    """One slot (``rss``: what a worker node reported for its actor)."""
    state = "restarting" if record.backoff_until else "down"
    if proc is not None:
        state = "stopping" if proc.stopping else ("ready" if proc.ready else "starting")
        if spec.node is None:
            rss = local_rss(proc.pid)
    return messages.ActorStatus(
        slot=spec.slot,
        role=spec.role,
        node=spec.node,
        pid=proc.pid or None if proc else None,
        state=state,
        restarts=record.restarts,
        rss=rss if proc else None,
        running=proc.busy if proc else 0,
        held=len(proc.running) - proc.busy if proc else 0,
        tasks_done=proc.tasks_done if proc else 0,
        last_exit=record.last_exit,
        keys=keys,
    )


class StatusReport:
    """Builds a ``messages.StatusSnapshot``."""

    def __init__(
        self,
        *,
        state_dir: Path,
        endpoint: str,
        started_at: float,
        store: TaskStore,
        tasks: TaskTable,
        intake: Intake,
        attempts: Attempts,
        retention: Retention,
        children: Children,
        nodes: NodeTable,
        tally: TaskTally,
        membership: Membership | None = None,
    ) -> None:
        self._state_dir = state_dir
        self._endpoint = endpoint
        self._started_at = started_at
        self._store = store
        self._tasks = tasks
        self._intake = intake
        self._attempts = attempts
        self._retention = retention
        self._children = children
        self._nodes = nodes
        self._membership = membership
        self._tally = tally

    def snapshot(self) -> messages.StatusSnapshot:
        children, tasks, intake = self._children, self._tasks, self._intake
        keys = tasks.keys_by_owner()
        actors = []
        for spec in children.all_specs():
            proc = children.get(spec.slot)
            node_rss = children.rss_of(proc) if proc is not None and spec.node else None
            actors.append(actor_status(proc, spec, children.records[spec.slot], keys[spec.slot], node_rss))
        space = self._store.space()
        supervisor = messages.SupervisorStatus(
            pid=os.getpid(),
            state="stopping" if children.stopping else "running",
            started_at=self._started_at,
            state_dir=str(self._state_dir),
            rss=psutil.Process().memory_info().rss,
            endpoint=self._endpoint,
            live_tasks=intake.live_count(),
            in_memory=len(tasks),
            backlog=intake.backlog,
            store_bytes=space.store_bytes,
            wal_bytes=space.wal_bytes,
            free_bytes=space.free_bytes,
            store_full=space.full,
        )
        members, member = self._membership.status() if self._membership is not None else ([], None)
        nodes = self._nodes.status(time.monotonic())
        return messages.StatusSnapshot(supervisor, actors, nodes, self.task_counts(), members, member)

    def task_counts(self) -> dict[str, int]:
        """Tasks per state, without scanning the table: live ones from memory, finished ones
        counted as they finish, less those pruned since."""
        counts = self._tasks.states()
        held = sum(len(proc.running) - proc.busy for proc in self._children)  # sent, not begun
        counts[RUNNING] -= held
        counts[QUEUED] += held + self._intake.backlog
        counts.update(self._attempts.finished - self._retention.pruned)
        counts[SCHEDULED] = self._store.count_state(SCHEDULED)  # most of them live in the store only
        return {str(state): n for state, n in counts.items() if n}

    def metrics_view(self) -> MetricsView:
        """What ``/metrics`` shows, copied for the scrape thread (published once a second); the
        RSS of a local actor is read there, by pid, not here."""
        children = self._children
        actors = []
        for spec in children.all_specs():
            proc, record = children.get(spec.slot), children.records[spec.slot]
            if proc is None:
                state, pid, rss = ("restarting" if record.backoff_until else "down"), None, None
            else:
                state = "stopping" if proc.stopping else ("ready" if proc.ready else "starting")
                pid = None if spec.node else proc.pid or None
                rss = children.rss_of(proc) if spec.node else None
            actors.append(ActorGauge(spec.slot, spec.role, spec.node or "", state, record.restarts, pid, rss))
        counts = self.task_counts()
        tasks = {str(state).lower(): counts.get(str(state), 0) for state in (QUEUED, SCHEDULED, RUNNING)}
        return MetricsView.of(self._tally, tasks, self._intake.backlog, tuple(actors), len(self._nodes.status(0.0)))
