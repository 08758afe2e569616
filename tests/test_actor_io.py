"""An actor reads its socket from an event-loop callback and sends from the same thread. The
socket's fd is edge-triggered, and a send can swallow the edge of a message that arrived
meanwhile; the actor must look again after each send, or it stops hearing its supervisor."""

from __future__ import annotations

import asyncio

import capsule_actors as cpsl

app = cpsl.App("actor-io")


@app.task
async def echo(i: int) -> int:
    await asyncio.sleep(0)
    return i


@app.task(process=True)
def process_echo(i: int) -> int:
    return i


def test_a_busy_worker_actor_misses_no_run(start):
    """Thousands of Runs arrive while the actor sends a Done for each one before them."""
    start(app, workers=1, process_workers=1)
    for _ in range(3):
        handles = echo.map(range(3000))
        assert cpsl.wait_all(handles, timeout=90) == list(range(3000))


def test_a_busy_process_actor_misses_no_run(start):
    """The same through a process actor: Done, Started and Withdrawn interleave with held Runs."""
    start(app, workers=1, process_workers=2)
    for _ in range(3):
        handles = process_echo.map(range(1500))
        assert cpsl.wait_all(handles, timeout=90) == list(range(1500))
