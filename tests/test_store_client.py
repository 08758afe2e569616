"""The store-only client: app code on a host with no supervisor submits straight into a cluster's
PostgreSQL store (``CAPSULE_STORE``), and results, events, subscribe, cancel and ``from_id``
work from there for any task.

The members are real ``capsule-actors run --name`` processes started by ``test_cluster``'s
harness (the ``cluster`` fixture: a fresh schema per test, every member SIGKILLed by pid at
teardown). The store-only client is this test process, with ``CAPSULE_STORE`` set and a state
directory no supervisor ever used (``client_app``); one test runs it as a script of its own.

What is checked:
- with no supervisor for its state directory, an App's client is the store-only one; unlocked
  submits run on the members and ``result()`` returns (a script, and in-process);
- a delayed submit is SCHEDULED in the store and runs when due (the clock's member is woken);
- locked submits are decided by the member holding their key's shard, on either member:
  ``queue`` runs them one after the other, ``join`` returns the holder's handle, ``reject``
  raises LockConflict naming it;
- cancel of a task a member runs, of one queued behind a lock key's holder, and of one still in
  the pool;
- ``TaskHandle.from_id`` (from another App, and for a task submitted through a member),
  ``events()``, ``app.subscribe()`` and ``session.db``;
- with no notification heard (no LISTEN), the polls answer everything;
- a submit while no member runs is durable (the client closes) and runs once a member starts;
  a locked one then gives up, withdrawn, with NotRunning;
- bad input (an unknown task name, an oversized payload, a workflow) is refused with the
  normal client's error and records nothing; a task the client has and the members do not
  fails there with UnknownTask, and the members go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import cluster_app
import psycopg
import pytest
from conftest import ROOT, wait_until
from test_cluster import (  # the cluster harness and its fixture, shared
    SHARDS,
    TESTS,
    Cluster,
    Member,
    assert_no_key_ran_twice_at_once,
    cluster,  # noqa: F401
    record,
    runs_by_tag,
)

import capsule_actors as cpsl
from capsule_actors import store_client
from capsule_actors.client import Client
from capsule_actors.store.cluster import shard_of
from capsule_actors.store.postgres import split_url
from capsule_actors.transport import RUNTIME_FILE


# ---- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def client_app(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> cpsl.App:  # noqa: F811
    """The cluster's App in this process, on a state directory no supervisor ever used, with
    CAPSULE_STORE naming the cluster's store: its client is the store-only one."""
    monkeypatch.setenv("CAPSULE_STORE", cluster.url)
    return cluster_app.make_app(cluster.root / "client")


def query(members: Cluster, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the cluster's schema (``{s}`` names it)."""
    libpq, schema = split_url(members.url, "cluster")
    with psycopg.connect(libpq, autocommit=True) as conn:
        return list(conn.execute(sql.replace("{s}", schema), params).fetchall())


def key_held_by(members: Cluster, member: Member, template: str) -> str:
    """A key whose lock key (``template`` formatted with it) is in a shard ``member`` holds."""
    held = {
        shard
        for shard, name in query(
            members,
            "SELECT s.shard, m.name FROM {s}.shards s JOIN {s}.members m ON m.id = s.owner "
            "WHERE m.state = 'live' AND s.shard >= 0",
        )
        if name == member.name
    }
    return next(f"x{i}" for i in range(10_000) if shard_of(template.format(key=f"x{i}")) in held)


def two_members(members: Cluster) -> tuple[Member, Member]:
    alpha = members.start("alpha")
    bravo = members.start("bravo")
    members.wait_formed("alpha", "bravo", min_shards=SHARDS // 4)
    return alpha, bravo


def task_count(members: Cluster) -> int:
    return int(query(members, "SELECT count(*) FROM {s}.tasks")[0][0])


# ---- the tests -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_script_with_capsule_store_and_no_supervisor_submits_and_gets_results(cluster):  # noqa: F811
    # Given two members, and a script whose state directory no supervisor ever used
    alpha, _ = two_members(cluster)
    client_dir = cluster.root / "client"
    script = (
        "import json, sys\n"
        "import capsule_actors as cpsl\n"
        "import cluster_app\n"
        "app = cluster_app.make_app(sys.argv[1])\n"
        "where = app.tasks['where']\n"
        "handles = where.map([0.05] * 20) + [where.submit(0.0)]\n"
        "ran = cpsl.wait_all(handles, timeout=90)\n"
        "print(json.dumps({'client': type(app.client()).__name__, 'ran': ran, 'ids': [h.id for h in handles]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    env.update(CAPSULE_STORE=cluster.url, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))

    # When it submits 21 unlocked tasks with CAPSULE_STORE set
    r = subprocess.run(
        [sys.executable, "-c", script, str(client_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=cluster.root,
        env=env,
    )

    # Then its client was the store-only one, and every task ran on a member and returned
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["client"] == "StoreClient"
    assert len(out["ran"]) == 21 and set(out["ran"]) <= {"alpha", "bravo"}, out["ran"]
    # ... recorded as any task (a member answers for it), and no supervisor state was made for the script
    assert all(record(alpha, task_id)["state"] == "SUCCEEDED" for task_id in out["ids"])
    assert not (client_dir / RUNTIME_FILE).exists()


@pytest.mark.timeout(150)
def test_unlocked_and_delayed_submits_run_on_the_members(cluster, client_app):  # noqa: F811
    # Given two members, and this process's App (no supervisor for its state directory)
    two_members(cluster)
    where = client_app.tasks["where"]
    assert type(client_app.client()).__name__ == "StoreClient"

    # When it submits unlocked tasks (async too), and one delayed by 2 s
    handles = where.map([0.01] * 10)
    began = time.time()
    later = where.options(delay=2.0).submit(0.0)

    # Then the delayed one is SCHEDULED in the store until then
    assert later.status() == cpsl.TaskState.SCHEDULED

    # ... every task runs on a member and returns; the delayed one when due (its clock woken by
    # the submit's note, not at its next look a minute later)
    assert set(cpsl.wait_all(handles, timeout=60)) <= {"alpha", "bravo"}
    assert later.result(timeout=30) in ("alpha", "bravo")
    info = later.info()
    assert info.state == cpsl.TaskState.SUCCEEDED and info.attempts == 1
    assert began + 2.0 <= info.started_at < began + 12.0, (began, info)

    async def async_submit() -> Any:
        return await (await where.asubmit(0.0))

    import asyncio

    assert asyncio.run(async_submit()) in ("alpha", "bravo")


@pytest.mark.timeout(180)
def test_locked_submits_are_decided_by_the_holder_of_their_shard(cluster, client_app):  # noqa: F811
    # Given two members, and for each one a key of each locked task in a shard it holds
    alpha, bravo = two_members(cluster)
    held, joined, refused = (client_app.tasks[n] for n in ("held", "joined", "refused"))

    for member in (alpha, bravo):
        # When two `held` tasks (on_conflict="queue") of one key are submitted
        key = key_held_by(cluster, member, "k:{key}")
        first = held.submit(key, 1.0, cluster.records, f"{member.name}-q1")
        second = held.submit(key, 0.1, cluster.records, f"{member.name}-q2")
        # Then both run, on that member, one after the other
        assert [first.result(timeout=60), second.result(timeout=60)] == [member.name, member.name]
        runs = runs_by_tag(cluster.records)
        assert runs[f"{member.name}-q2"][0].first > runs[f"{member.name}-q1"][0].last

        # When a `joined` task (on_conflict="join") is submitted while one of its key runs
        key = key_held_by(cluster, member, "j:{key}")
        holder = joined.submit(key, 2.0)
        joiner = joined.submit(key, 0.0)
        # Then the second is the holder's handle, deduplicated, with its result
        assert joiner.id == holder.id and joiner.deduplicated and not holder.deduplicated
        assert joiner.result(timeout=60) == member.name

        # When a `refused` task (on_conflict="reject") is submitted while one of its key runs
        key = key_held_by(cluster, member, "r:{key}")
        live = refused.submit(key, 2.0)
        with pytest.raises(cpsl.LockConflict, match=live.id) as conflict:
            refused.submit(key, 0.0)
        # Then LockConflict names the live one, and once it has ended the key is free again
        assert conflict.value.holder_id == live.id  # type: ignore[attr-defined]
        assert live.result(timeout=60) == member.name
        assert refused.submit(key, 0.0).result(timeout=60) == member.name

    assert_no_key_ran_twice_at_once(cluster.records)
    # ... and no admission was left behind
    assert query(cluster, "SELECT count(*) FROM {s}.admissions")[0][0] == 0


@pytest.mark.timeout(180)
def test_cancel_of_a_running_task_and_of_one_queued_behind_its_key(cluster, client_app):  # noqa: F811
    # Given two members
    alpha, _ = two_members(cluster)
    where, held = client_app.tasks["where"], client_app.tasks["held"]

    # When a process task that runs for 30 s is cancelled while it runs
    running = where.submit(30.0)
    wait_until(lambda: running.status() == cpsl.TaskState.RUNNING, 30, interval=0.05)
    assert running.cancel() is True

    # Then it ends CANCELLED at once (its process is stopped), and result() says so
    with pytest.raises(cpsl.TaskCancelled):
        running.result(timeout=15)
    assert running.status() == cpsl.TaskState.CANCELLED

    # When a locked task queued behind the holder of its key (on the other member's shard or
    # this one's) is cancelled
    key = key_held_by(cluster, alpha, "k:{key}")
    first = held.submit(key, 2.0, cluster.records, "first")
    queued = held.submit(key, 0.1, cluster.records, "queued")
    assert queued.status() == cpsl.TaskState.QUEUED
    assert queued.cancel() is True

    # Then it never runs, and the holder goes on
    with pytest.raises(cpsl.TaskCancelled):
        queued.result(timeout=15)
    assert first.result(timeout=60) == "alpha"
    assert "queued" not in runs_by_tag(cluster.records)
    # ... a cancel of a task that ended says so
    assert first.cancel() is False
    assert query(cluster, "SELECT count(*) FROM {s}.cancels")[0][0] == 0


@pytest.mark.timeout(150)
def test_from_id_events_subscribe_and_session_db(cluster, client_app):  # noqa: F811
    # Given two members, a task submitted from here with a session, and one through a member
    alpha, _ = two_members(cluster)
    where = client_app.tasks["where"]
    mine = where.submit(0.2, session=cpsl.Session("chat-1"))
    theirs = alpha.app.tasks["where"].submit(0.0)

    # When another App of this process (store-only too) re-attaches to them by id
    other = cluster_app.make_app(cluster.root / "other")
    again = cpsl.TaskHandle.from_id(other, mine.id)
    remote = cpsl.TaskHandle.from_id(other, mine.id[-8:])  # a short id works too
    assert (again.name, remote.id) == ("where", mine.id)

    # Then events() follows it to its end, and result() returns, for either task
    kinds = [(e.kind, e.data.get("state")) for e in again.events()]
    assert kinds[0] == ("state", "QUEUED") and kinds[-1] == ("state", "SUCCEEDED"), kinds
    assert ("state", "RUNNING") in kinds
    assert again.result(timeout=30) in ("alpha", "bravo")
    assert cpsl.TaskHandle.from_id(other, theirs.id).result(timeout=30) in ("alpha", "bravo")

    # ... and the session's subscription has every state of the task, in order
    seen = []
    for event in client_app.subscribe("chat-1", timeout=30):
        seen.append(event.data.get("state"))
        if event.task_id == mine.id and event.data.get("state") == "SUCCEEDED":
            break
    assert seen[0] == "QUEUED" and "RUNNING" in seen

    # ... and a session's db is read and written in the store, as a member's tasks see it
    db = client_app.session("chat-1").db
    db["visits"] = 1
    assert db.increment("visits") == 2 and dict(db.items()) == {"visits": 2}
    assert alpha.app.session("chat-1").db["visits"] == 2

    # ... and an unknown id is UnknownTask, as from a supervisor
    with pytest.raises(cpsl.UnknownTask):
        cpsl.TaskHandle.from_id(other, "0" * 32)


@pytest.mark.timeout(150)
def test_a_submit_while_no_member_runs_is_durable_and_runs_when_one_starts(cluster, client_app, monkeypatch):  # noqa: F811
    # Given no member at all (the store's schema is not even made yet)
    where, held = client_app.tasks["where"], client_app.tasks["held"]
    monkeypatch.setattr(store_client, "NO_MEMBER", 1.0)

    # When unlocked tasks are submitted, and one of them is cancelled while in the pool
    handles = where.map([0.0] * 3)
    assert [h.status() for h in handles] == [cpsl.TaskState.QUEUED] * 3
    assert handles[0].cancel() is True

    # Then the cancelled one ends at once, with its state event
    assert handles[0].status() == cpsl.TaskState.CANCELLED
    assert [e.data.get("state") for e in handles[0].events()] == ["QUEUED", "CANCELLED"]

    # ... and a locked submit, which no member can decide, is withdrawn: NotRunning, nothing recorded
    before = task_count(cluster)
    with pytest.raises(cpsl.NotRunning, match="withdrawn"):
        held.submit("nobody", 0.1, cluster.records, "never")
    assert task_count(cluster) == before
    assert query(cluster, "SELECT count(*) FROM {s}.admissions")[0][0] == 0

    # When this process's client closes (its memory gone), and a member starts
    ids = [h.id for h in handles]
    Client.close_all()
    cluster.start("alpha")

    # Then the others run there, and the cancelled one stays cancelled
    again = [cpsl.TaskHandle.from_id(client_app, task_id) for task_id in ids]
    assert [h.result(timeout=60) for h in again[1:]] == ["alpha", "alpha"]
    with pytest.raises(cpsl.TaskCancelled):
        again[0].result(timeout=10)


@pytest.mark.timeout(150)
def test_without_notifications_polling_answers_everything(cluster, client_app, monkeypatch):  # noqa: F811
    # Given a member, and a store-only client that cannot LISTEN (say, a pooler that drops it)
    def deaf(self: store_client.StoreClient) -> None:
        self._listener = None

    monkeypatch.setattr(store_client.StoreClient, "_relisten", deaf)
    alpha = cluster.start("alpha")
    where, held = client_app.tasks["where"], client_app.tasks["held"]

    # When it submits, waits, asks for a lock key's admission and cancels
    assert cpsl.wait_all(where.map([0.0] * 3), timeout=30) == ["alpha"] * 3
    key = key_held_by(cluster, alpha, "k:{key}")
    first = held.submit(key, 1.0, cluster.records, "first")
    queued = held.submit(key, 0.1, cluster.records, "queued")
    assert queued.cancel() is True

    # Then every answer came all the same (from the polls)
    assert first.result(timeout=30) == "alpha"
    with pytest.raises(cpsl.TaskCancelled):
        queued.result(timeout=10)


@pytest.mark.timeout(150)
def test_bad_input_gets_the_normal_clients_error_and_records_nothing(cluster, client_app):  # noqa: F811
    # Given a member (for the normal client's answers) and this process's store-only client
    alpha = cluster.start("alpha")
    where = client_app.tasks["where"]
    item, payload = where.prepare((0.1,), {}, None, None)
    before = task_count(cluster)

    def refusal(app: cpsl.App, name: str, frame: bytes) -> BaseException:
        with pytest.raises(cpsl.CapsuleError) as caught:
            app.client().submit(name, [([item[0][:-4] + "beef", name, *item[2:]], frame)])
        return caught.value

    # When a task name the app does not have is submitted, through either client
    ours, normal = refusal(client_app, "nosuch", payload), refusal(alpha.app, "nosuch", payload)

    # Then both refuse it with the same error
    assert type(ours) is type(normal) is cpsl.UnknownTask
    assert str(ours) == str(normal) and "has no task 'nosuch'" in str(ours)

    # When a payload over max_payload_bytes is submitted
    big = b"x" * (client_app.max_payload_bytes + 1)
    ours, normal = refusal(client_app, "where", big), refusal(alpha.app, "where", big)
    assert type(ours) is type(normal) is cpsl.SerializationError and str(ours) == str(normal)
    client_app.max_payload_bytes = 1000  # and through the task, before anything is sent
    with pytest.raises(cpsl.SerializationError, match="max_payload_bytes=1000"):
        where.submit("y" * 2000)

    # When a workflow is submitted straight into the store
    with pytest.raises(cpsl.ConfigError, match="through a cluster member"):
        cpsl.group([where.s(0.0), where.s(0.1)]).submit()

    # Then nothing of any of them was recorded
    assert task_count(cluster) == before


@pytest.mark.timeout(150)
def test_a_task_the_members_do_not_have_fails_there_and_they_go_on(cluster, client_app):  # noqa: F811
    # Given a member, and a client whose App has tasks the member's does not (another version)
    alpha = cluster.start("alpha")

    @client_app.task
    def newer() -> int:
        return 1

    @client_app.task(lock="newer")
    def newer_locked() -> int:
        return 2

    # When both are submitted straight into the store (the client cannot know the members' tasks)
    unlocked, locked = newer.submit(), newer_locked.submit()

    # Then each fails with UnknownTask where a member takes it, and the member goes on working
    for handle in (unlocked, locked):
        with pytest.raises(cpsl.TaskFailed, match="UnknownTask: the app has no task 'newer"):
            handle.result(timeout=30)
    assert alpha.proc.poll() is None, alpha.log()
    assert client_app.tasks["where"].submit(0.0).result(timeout=30) == "alpha"


def test_the_client_is_a_supervisors_where_one_runs_or_without_a_postgresql_store(tmp_path, monkeypatch):
    # An App with no PostgreSQL store: the normal client (NotRunning: nobody to submit to)
    monkeypatch.delenv("CAPSULE_STORE", raising=False)
    app = cluster_app.make_app(tmp_path / "state")
    with pytest.raises(cpsl.NotRunning):
        app.client()
    # ... and one on a remote supervisor (CAPSULE_CONNECT) is never store-only
    from capsule_actors import bootstrap

    config = bootstrap.ClientConfig(tmp_path / "state")
    assert bootstrap.store_only(config, "postgresql://u@h/db") == "postgresql://u@h/db"
    assert bootstrap.store_only(config, None) is None
    remote = bootstrap.ClientConfig(tmp_path / "state", remote=object())  # type: ignore[arg-type]
    assert bootstrap.store_only(remote, "postgresql://u@h/db") is None
