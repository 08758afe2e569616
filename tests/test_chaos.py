"""Chaos, the short version of ``benchmarks/chaos.py`` (same code, imported from there): 300
tasks of every kind while actors are SIGKILLed every 50-200 ms for about 5 s and the supervisor
is SIGKILLed and started again once; then every check of the long version, as assertions."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsule_actors.client import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402


@pytest.fixture
def chaos_run() -> Iterator[chaos.Chaos]:
    """A short chaos run in a short private directory; every process it started is killed."""
    with tempfile.TemporaryDirectory(prefix="cpsl-chaos-") as d:
        cfg = chaos.Config(tasks=300, seed=7, submit_seconds=5.0, supervisor_kills=1, tail=1.0,
                           drain_timeout=40.0, stall_timeout=15.0, start_timeout=30.0)
        run = chaos.Chaos(cfg, Path(d))
        try:
            yield run
        finally:
            run.stop_submitting.set()
            run.stop_killing.set()
            run.service.kill_all()
            Client.close_all()


def test_chaos_loses_nothing_and_never_overlaps_a_lock(chaos_run: chaos.Chaos) -> None:
    report = chaos_run.run()
    summary = "\n".join(report.lines())
    print(summary)
    assert not report.failures, "\n".join([*report.failures, summary, chaos_run.service.log_tail()])
    assert report.acknowledged == 300
    assert report.succeeded + sum(report.failed.values()) + report.cancelled == report.acknowledged
    assert report.supervisor_restarts == 1
    assert sum(report.actor_kills.values()) >= 10, summary
    assert report.integrity == "ok"
    assert report.locked_bodies > 0
