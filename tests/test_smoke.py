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


def test_profile_dir_profiles_the_supervisor_and_each_actor(start, tmp_path, monkeypatch):
    import pstats

    monkeypatch.setenv("CAPSULE_PROFILE_DIR", str(tmp_path))  # the runtime's processes inherit it
    rt = start(app)
    assert [add.submit(i, 1).result(timeout=30) for i in range(20)] == list(range(1, 21))
    rt.stop()
    names = {p.name.split(".")[0] for p in tmp_path.glob("*.prof")}
    assert {"supervisor", "w0"} <= names
    [sup] = tmp_path.glob(f"supervisor.{rt.pid}.prof")
    functions = {f[2] for f in pstats.Stats(str(sup)).stats}  # type: ignore[attr-defined]
    assert "on_submit" in functions and "dispatch" in functions
