"""The app every member of the cluster tests (``test_cluster.py``) runs: ``cluster_app:app``.

Each member is started with ``CLUSTER_MEMBER=<its name>`` in its environment, which its actors
inherit, so a task knows which member runs it. Tasks record what they did with ``append_line``
(one atomic line each) into a file whose path the test passes as an argument; every line is
``kind,member,tag,key,run,time`` (``tag``: the test's name for the task, since a task does not
know its own id; ``run``: a fresh id per attempt).

``make_app(state_dir)`` builds the same App (same name, same tasks) bound to one member's state
directory: the test process holds one per member, to submit through (and read from) either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid

from conftest import append_line

import capsule_actors as cpsl

BEAT_LOG = "CLUSTER_BEAT_LOG"  # set: the app has the schedule `beat` (every 2 s), logging there
TICK = 0.05  # seconds between a locked run's "tick" lines


def member() -> str:
    return os.environ.get("CLUSTER_MEMBER", "?")


def record(log: str, kind: str, tag: str = "", key: str = "", run: str = "") -> None:
    append_line(log, f"{kind},{member()},{tag},{key},{run},{time.time():.6f}")


def make_app(state_dir: str | os.PathLike[str] | None = None) -> cpsl.App:
    app = cpsl.App("cluster", state_dir=state_dir, workers=1, process_workers=1, grace=5.0)

    @app.task(process=True, retries=3)
    def where(seconds: float) -> str:
        """Unlocked work, one per process: which member ran it."""
        time.sleep(seconds)
        return member()

    @app.task(lock="k:{key}", on_conflict="queue", retries=3)
    def held(key: str, seconds: float, log: str, tag: str) -> str:
        """Holds key ``key`` for ``seconds`` (``hold``)."""
        return hold(key, seconds, log, tag)

    @app.task(lock="k:{key}", on_conflict="queue", retries=3)
    def then(prev: str, key: str, seconds: float, log: str, tag: str) -> str:
        """A locked workflow step: holds its key as ``held`` does, after the step before it."""
        return f"{prev}>{hold(key, seconds, log, tag)}"

    @app.task(retries=3)
    def count(name: str) -> int:
        """Adds one to ``name`` in its session's ``session.db`` (a compare-and-set loop)."""
        session = cpsl.current_session()
        assert session is not None
        return int(session.db.increment(name))

    def hold(key: str, seconds: float, log: str, tag: str) -> str:
        """Takes a non-blocking flock on a file of the key while it runs (an ``overlap`` line if
        another run holds it), and writes ``start``, a ``tick`` every TICK s, then ``end``: a run
        that was killed stops ticking, so its last tick is when it last ran."""
        run = uuid.uuid4().hex[:12]
        lock_dir = log + ".locks"
        os.makedirs(lock_dir, exist_ok=True)
        with open(os.path.join(lock_dir, key), "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record(log, "overlap", tag, key, run)
            record(log, "start", tag, key, run)
            end = time.time() + seconds
            while time.time() < end:
                time.sleep(min(TICK, max(0.0, end - time.time())))
                record(log, "tick", tag, key, run)
            record(log, "end", tag, key, run)
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
        return member()

    @app.task(lock="j:{key}", on_conflict="join")
    def joined(key: str, seconds: float) -> str:
        """A lock key whose later submits join the live one (``test_store_client.py``)."""
        time.sleep(seconds)
        return member()

    @app.task(lock="r:{key}", on_conflict="reject")
    def refused(key: str, seconds: float) -> str:
        """A lock key whose later submits are refused while one is live (``test_store_client.py``)."""
        time.sleep(seconds)
        return member()

    if os.environ.get(BEAT_LOG):

        @app.schedule("*/2 * * * * *")
        def beat() -> None:
            """Every even second: who fired it, and when (its slot is the even second before)."""
            record(os.environ[BEAT_LOG], "beat")

    return app


app = make_app()
