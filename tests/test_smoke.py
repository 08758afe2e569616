"""The shortest path through the runtime: submit, run in an actor, result back."""

from __future__ import annotations

import os

import capsule_actors as cpsl

app = cpsl.App("smoke")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
def whoami() -> int:
    return os.getpid()


def test_submit_runs_in_an_actor_and_returns_the_value(start):
    rt = start(app)
    # Given a running runtime, when a task is submitted, then an actor process computes it
    assert add.submit(1, 2).result(timeout=30) == 3
    pid = whoami.submit().result(timeout=30)
    actor_pids = {a["pid"] for a in rt.status()["actors"]}
    assert pid in actor_pids and pid not in (os.getpid(), rt.pid)


def test_direct_call_runs_in_the_caller():
    import asyncio

    assert asyncio.run(add(2, 3)) == 5
    assert whoami() == os.getpid()
