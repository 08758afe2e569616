"""The store interface, on every store (``store_kind``: SQLite and PostgreSQL): what the supervisor,
the clock and the board rely on, checked directly on the store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from capsule_actors import store as stores
from capsule_actors.states import FAILED, QUEUED, SCHEDULED, SUCCEEDED, TaskState
from capsule_actors.store import NewTask
from capsule_actors.store.base import KeptArgs

STORES = ("sqlite", "postgresql")


def new(task_id: str, name: str = "t", state: TaskState = QUEUED, lock_key: str | None = None,
        session_id: str | None = None, run_at: float | None = None, args: bytes = b"args") -> NewTask:
    return NewTask(task_id, name, state, lock_key, session_id, None, args, time.time(), run_at)


def test_inserts_are_idempotent_and_keep_submit_order(task_store):
    db = task_store
    db.begin()
    first = db.insert_tasks([new("a"), new("b"), new("c", lock_key="k")])
    again = db.insert_tasks([new("b"), new("d")])  # b is known: ignored
    db.commit()
    assert [t for t, _ in first] == ["a", "b", "c"] and [t for t, _ in again] == ["d"]
    rowids = [r for _, r in first + again]
    assert rowids == sorted(rowids) and len(set(rowids)) == 4
    assert [t.id for t in db.live_tasks()] == ["a", "b", "c", "d"]
    assert [t.id for t in db.backlog(0, rowids[0], 10)] == ["b", "d"]  # unlocked, after a
    assert db.live_locked() == [("c", "t", "k")]
    assert not db.dirty()


def test_an_attempt_and_its_outcome_with_events_in_order(task_store):
    db = task_store
    db.begin()
    db.insert_tasks([new("x", session_id="s1", args=b"\x00\x01pickled")])
    # kept from the insert, then read back from the store: the same bytes either way
    assert db.args("x") == db.args("x") == b"\x00\x01pickled"
    db.mark_running("x", "s1", 1, "w0", time.time())
    db.finish("x", "s1", SUCCEEDED, b"result", None, time.time())
    db.commit()
    state, result, error = db.outcome("x")
    assert (state, result, error) == (SUCCEEDED, b"result", [None, None, None])
    events = db.events_after(0, task_id="x")
    assert [e["data"]["state"] for e in events] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert db.events_after(0, session_id="s1") == events
    touched, sessions, any_event = db.take_touched()
    assert touched == {"x"} and sessions == {"s1"} and any_event
    assert db.take_touched() == (set(), set(), False)
    info = db.info("x")
    assert info is not None and info["attempts"] == 1 and info["slot"] == "w0" and info["state"] == "SUCCEEDED"
    # the state events' JSON is written without json.dumps of a dict (store.base.quoted): any name
    # or slot text comes back as it was
    odd = 'a "quoted"\\ name ñ\n'
    db.begin()
    db.insert_tasks([new("y", name=odd)])
    db.mark_running("y", None, 2, 'n"1/w0', time.time())
    db.finish("y", None, FAILED, None, ("E", "bad", "tb"), time.time())
    db.commit()
    assert [e["data"] for e in db.events_after(0, task_id="y")] == [
        {"state": "QUEUED", "attempt": 0, "name": odd},
        {"state": "RUNNING", "attempt": 2, "slot": 'n"1/w0'},
        {"state": "FAILED", "error": "E: bad"},
    ]


def test_retry_requeue_and_failure_keep_the_error(task_store):
    db = task_store
    db.begin()
    db.insert_tasks([new("r")])
    db.mark_running("r", None, 1, "p0", time.time())
    db.requeue("r", None, time.time() + 5, ("ValueError", "boom", "tb"))
    row = db.live_task("r")
    assert row is not None and row.state == QUEUED and row.run_at is not None and row.attempts == 1
    db.requeue("r", None, None, None, attempts=0)  # a stop that gives the attempt back
    assert db.live_task("r").attempts == 0 and db.info("r")["error_type"] == "ValueError"
    db.finish("r", None, FAILED, None, ("ValueError", "boom", "tb"), time.time())
    db.commit()
    assert db.outcome("r") == (FAILED, None, ["ValueError", "boom", "tb"])
    assert db.live_task("r") is None and db.counts() == {"FAILED": 1}


def test_scheduled_tasks_are_read_by_the_clock_through_a_reader(task_store, store_reader):
    db = task_store
    now = time.time()
    db.begin()
    db.insert_tasks([new("soon", state=SCHEDULED, run_at=now - 1), new("later", state=SCHEDULED, run_at=now + 60)])
    reader = store_reader()
    with reader.snapshot():
        assert reader.due_scheduled(now, 10) == []  # not committed yet: readers see commits only
    db.commit()
    with reader.snapshot():
        assert reader.due_scheduled(now, 10) == ["soon"]
        assert reader.next_scheduled_after(now) == pytest.approx(now + 60)
    assert db.count_state(SCHEDULED) == 2


def test_waiting_workflow_steps_are_found_released_and_never_due(task_store, store_reader):
    """A waiting step (SCHEDULED, no run_at) is listed for recovery and never handed to the clock;
    its arguments are replaced when it is released, and its inputs' results come in one read."""
    db = task_store
    now = time.time()
    db.begin()
    db.insert_tasks([new("in1"), new("in2"), new("wait", state=SCHEDULED, session_id="s", args=b"envelope")])
    db.insert_tasks([new("delayed", state=SCHEDULED, run_at=now + 60)])
    db.finish("in1", None, SUCCEEDED, b"r1", None, now)
    db.finish("in2", None, SUCCEEDED, b"r2", None, now)
    db.commit()
    reader = store_reader()
    with reader.snapshot():
        assert reader.due_scheduled(now + 3600, 10) == ["delayed"]  # the waiting step is never due
    db.begin()
    assert db.flow_waiting() == [("wait", "s", b"envelope")]
    assert db.results(["in1", "in2", "gone"]) == {"in1": b"r1", "in2": b"r2"}
    db.set_args("wait", b"released")
    db.requeue("wait", "s", None, None)
    assert db.args("wait") == b"released" and db.flow_waiting() == []
    db.mark_running("wait", "s", 1, "w0", now)
    assert db.args("wait") == b"released"  # from the store this time (a kept value is taken once)
    db.commit()


def test_a_locked_step_takes_its_key_and_a_new_place_in_submit_order(task_store):
    """A released locked step admitted by its key's owner: its key and arguments are written, and
    it comes after the key's live tasks recorded before its admission (not its workflow's submit)."""
    db = task_store
    db.begin()
    db.insert_tasks([new("step", state=SCHEDULED, args=b"envelope"), new("holder", lock_key="k")])
    db.lock_step("step", "k", b"released")
    db.requeue("step", None, None, None)
    db.commit()
    assert db.live_locked() == [("holder", "t", "k"), ("step", "t", "k")]
    assert [t.id for t in db.live_tasks()] == ["holder", "step"]
    assert db.args("step") == b"released" and db.flow_waiting() == []


def test_schedule_marks_slots_and_session_values(task_store):
    db = task_store
    db.begin()
    db.register_schedules([("digest", "*/5 * * * *", "UTC")], 100.0)
    db.set_last_slot("digest", 300.0)
    assert db.slot_pending
    db.set_last_slot("digest", 200.0)  # never backwards
    db.commit()
    assert not db.slot_pending and db.last_slot("digest") == 300.0
    db.register_schedules([("digest", "*/5 * * * *", "UTC")], 500.0)  # unchanged: kept
    assert db.schedule_marks()["digest"] == {"registered_at": 100.0, "last_slot": 300.0}
    db.register_schedules([("digest", "0 * * * *", "UTC")], 600.0)  # changed: starts afresh
    assert db.schedule_marks()["digest"] == {"registered_at": 600.0, "last_slot": None}
    db.kv_set("s", "k", '{"a": 1}')
    db.kv_set("s", "k", "2")
    db.kv_set("s", "j", "3")
    db.commit()
    assert db.kv_get("s", "k") == "2" and db.kv_items("s") == [("j", "3"), ("k", "2")]
    assert db.kv_delete("s", "k") and not db.kv_delete("s", "k") and db.kv_get("s", "k") is None


def test_cards_follow_a_task_until_it_ends(task_store):
    db = task_store
    db.begin()
    db.insert_tasks([new("c1")])
    card = db.show_card("c1", "chat")
    assert card is not None and card["state"] == "QUEUED" and db.show_card("missing", "chat") is None
    db.mark_running("c1", None, 1, "w0", time.time())
    db.finish("c1", None, SUCCEEDED, b"", None, time.time())
    db.mark_running("c1", None, 2, "w0", time.time())  # after the end: no more card updates
    db.commit()
    cards = [e["data"] for e in db.events_after(0, session_id="chat") if e["kind"] == "card"]
    assert [c["state"] for c in cards] == ["RUNNING", "SUCCEEDED"] and all(c["update"] for c in cards)


def test_retention_prunes_old_events_and_expired_results_in_batches(task_store):
    db = task_store
    db.begin()
    db.insert_tasks([new(f"t{i}") for i in range(5)])
    db.finish("t0", None, SUCCEEDED, b"", None, 1.0)  # finished long ago, the oldest first
    db.finish("t1", None, FAILED, None, ("E", "m", ""), 2.0)
    db.finish("t2", None, SUCCEEDED, b"", None, 3.0)
    db.finish("t3", None, SUCCEEDED, b"", None, time.time())  # just now: kept
    db.commit()
    assert db.prune_finished(time.time() - 60, batch=2) == {"SUCCEEDED": 1, "FAILED": 1}
    assert db.prune_finished(time.time() - 60, batch=2) == {"SUCCEEDED": 1}
    assert db.prune_finished(time.time() - 60, batch=2) == {}
    assert [t.id for t in db.live_tasks()] == ["t4"] and db.exists("t3") and not db.exists("t0")
    assert db.events_after(0, task_id="t0") == []
    for _ in range(4):
        db.add_event("t4", None, "progress", {"fraction": 0.5})
    db.commit()
    kept = len(db.events_after(0))  # t3's two, t4's one and its four progress events
    assert db.prune_events(0.0, keep_max=2, batch=3) == 3  # a batch at most
    assert db.prune_events(0.0, keep_max=2, batch=100) == kept - 5 and len(db.events_after(0)) == 2
    assert db.prune_events(time.time() + 60, keep_max=100, batch=100) == 2  # by age


def test_the_board_reads_pages_counts_and_details(task_store, store_reader):
    db = task_store
    db.begin()
    db.insert_tasks([new(f"q{i}", name="alpha" if i % 2 else "beta") for i in range(7)])
    db.mark_running("q0", "sess", 1, "w1", time.time())
    db.add_event("q0", "sess", "progress", {"fraction": 0.5, "message": "half"})
    db.commit()
    reader = store_reader()
    page = reader.board(page_size=2, offsets={"QUEUED": 3}, names=True)
    columns = {c["state"]: c for c in page["columns"]}
    assert columns["QUEUED"]["count"] == 6 and columns["QUEUED"]["offset"] == 2
    assert len(columns["QUEUED"]["tasks"]) == 2 and columns["RUNNING"]["tasks"][0]["id"] == "q0"
    assert page["names"] == ["alpha", "beta"] and page["total"] == 7 and page["seq"] == reader.last_seq() > 0
    assert reader.board(name="alph")["total"] == 3
    detail = reader.task_detail("q0")
    assert detail is not None and detail["args_bytes"] == 4 and detail["result_bytes"] is None
    assert [e["kind"] for e in detail["events"]] == ["state", "state", "progress"]
    assert reader.task_detail("nope") is None


def test_the_backlog_is_paged_per_priority_in_submit_order(task_store):
    db = task_store
    db.begin()
    rows = [new(f"t{i}")._replace(priority=(i % 3) - 1) for i in range(12)]  # priorities -1, 0, 1
    db.insert_tasks([*rows, new("locked", lock_key="k")._replace(priority=1)])
    db.commit()
    for priority in (-1, 0, 1):
        page = db.backlog(priority, 0, 100)
        assert [t.id for t in page] == [r.id for r in rows if r.priority == priority]  # submit order
        assert {t.priority for t in page} == {priority}
        assert [t.id for t in db.backlog(priority, page[1].rowid, 2)] == [t.id for t in page[2:4]]
    assert {t.id: t.priority for t in db.live_tasks()}["locked"] == 1


def test_the_boards_queued_column_shows_the_next_to_run_first_by_priority(task_store, store_reader):
    db = task_store
    db.begin()
    db.insert_tasks([new("low")._replace(priority=-1), new("plain"), new("high")._replace(priority=3)])
    db.commit()
    queued = {c["state"]: c for c in store_reader().board()["columns"]}["QUEUED"]
    assert [t["id"] for t in queued["tasks"]] == ["high", "plain", "low"]


def _version(store_kind: str) -> int:
    """The schema version this code writes for the kind of store (PostgreSQL's has the cluster's tables)."""
    if store_kind == "sqlite":
        return stores.SCHEMA_VERSION
    from capsule_actors.store.postgres import SCHEMA_VERSION

    return SCHEMA_VERSION


def test_a_schema_1_store_is_migrated_keeping_its_tasks(store_kind, task_store_factory, store_reader):
    """A store written before priorities (schema 1) opens as the current schema: its tasks get
    priority 0. Before that, a reader (the CLI or board while no supervisor runs) refuses it,
    saying how to upgrade it, instead of failing on a missing column."""
    from capsule_actors.errors import StateDirError

    db = task_store_factory()
    db.begin()
    db.insert_tasks([new("old")])
    db.commit()
    if store_kind == "sqlite":  # back to what schema 1 was
        db.db.executescript(  # type: ignore[attr-defined]
            "DROP INDEX tasks_prioritized; ALTER TABLE tasks DROP COLUMN priority; "
            "ALTER TABLE tasks DROP COLUMN rate_key; ALTER TABLE tasks DROP COLUMN retried_as; "
            "DROP INDEX tasks_flow; ALTER TABLE tasks DROP COLUMN flow_id; "
            "UPDATE meta SET value='1' WHERE key='schema_version';"
        )
    else:
        s = db.schema  # type: ignore[attr-defined]
        for sql in (
            f"DROP INDEX {s}.tasks_prioritized",
            f"ALTER TABLE {s}.tasks DROP COLUMN priority",
            f"ALTER TABLE {s}.tasks DROP COLUMN rate_key",
            f"ALTER TABLE {s}.tasks DROP COLUMN retried_as",
            f"ALTER TABLE {s}.tasks DROP COLUMN flow_id",
            f"UPDATE {s}.meta SET value='1' WHERE key='schema_version'",
        ):
            db.db.execute(sql)  # type: ignore[attr-defined]
        db.db.commit()  # type: ignore[attr-defined]
    db.close()
    older = rf"schema version 1, older than this capsule_actors reads \({_version(store_kind)}\): start"
    with pytest.raises(StateDirError, match=older):
        store_reader().board()
    db = task_store_factory()
    assert [(t.id, t.priority) for t in db.live_tasks()] == [("old", 0)]
    queued = {c["state"]: c for c in store_reader().board()["columns"]}["QUEUED"]
    assert [t["id"] for t in queued["tasks"]] == ["old"]
    db.begin()
    db.insert_tasks([new("new")._replace(priority=4, rate_key="tenant:1")])
    db.commit()
    assert [(t.id, t.priority, t.rate_key) for t in db.backlog(4, 0, 10)] == [("new", 4, "tenant:1")]


def test_a_newer_schema_is_refused_naming_both_versions(store_kind, task_store_factory, store_reader):
    from capsule_actors.errors import StateDirError

    db = task_store_factory()
    db.begin()
    if store_kind == "sqlite":
        db.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")  # type: ignore[attr-defined]
    else:
        db.db.execute(f"UPDATE {db.schema}.meta SET value='99' WHERE key='schema_version'")  # type: ignore[attr-defined]
    db.commit()
    db.close()
    with pytest.raises(StateDirError, match=rf"schema version 99.*\({_version(store_kind)}\)"):
        task_store_factory()
    newer = rf"schema version 99, newer than this capsule_actors knows \({_version(store_kind)}\)"
    with pytest.raises(StateDirError, match=newer):
        store_reader().board()


def test_stores_are_found_by_url_and_apps_share_a_database_by_schema(tmp_path: Path, postgres):
    sqlite = stores.open_store(tmp_path, None, "app")
    assert isinstance(sqlite, stores.SQLiteStore) and (tmp_path / stores.DB_FILE).is_file()
    sqlite.close()
    url = postgres.url("capsule")
    one, two = stores.open_store(tmp_path, url, "Reports-1"), stores.open_store(tmp_path, url + "&schema=mine", "x")
    try:
        assert (one.schema, two.schema) == ("capsule_reports_1", "mine")  # type: ignore[attr-defined]
        one.begin()
        one.insert_tasks([new("only-in-one")])
        one.commit()
        assert one.exists("only-in-one") and not two.exists("only-in-one")
    finally:
        one.close()
        two.close()


def test_an_unreachable_server_or_a_bad_schema_is_a_clear_error(tmp_path: Path):
    from capsule_actors.errors import ConfigError, StateDirError

    url = f"postgresql://someone:s3cret@/capsule?host={tmp_path}&port=1"
    with pytest.raises(StateDirError, match=r"cannot reach the PostgreSQL store postgresql://someone:\*\*\*@") as err:
        stores.open_store(tmp_path, url, "app")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ConfigError, match="schema 'Bad-Name'"):
        stores.open_store(tmp_path, f"postgresql:///capsule?schema=Bad-Name&host={tmp_path}", "app")


def test_short_ids_are_found_by_their_ending_and_an_ending_of_two_is_refused(task_store, store_reader):
    from capsule_actors import ids
    from capsule_actors.errors import ConfigError, UnknownTask

    # Given tasks of one second: the same first 24 characters, and two that share their last 8
    base = "0190a1b2c3d4" + "e5f6a7b8c9d0"
    a, b, c = base + "00000001", base + "00000002", "0190a1b2c3d5" + "ffffffffffff" + "00000002"
    db = task_store
    db.begin()
    db.insert_tasks([new(a), new(b, state=SUCCEEDED), new(c)])
    db.commit()
    for reader in (db, store_reader()):
        # Then the last 8 find one task, a full id is itself, and an ending of two is refused naming both
        assert ids.resolve("00000001", reader.find_ids) == a
        assert ids.resolve(a, reader.find_ids) == a
        with pytest.raises(ConfigError, match=f"{b}.*{c}|{c}.*{b}"):
            ids.resolve("00000002", reader.find_ids)
        assert ids.resolve("d0" + "00000002", reader.find_ids) == b  # more of it tells them apart
        with pytest.raises(UnknownTask, match="0000000f"):
            ids.resolve("0000000f", reader.find_ids)
    reader = store_reader()
    assert reader.info(b)["state"] == "SUCCEEDED" and reader.counts() == {"QUEUED": 2, "SUCCEEDED": 1}
    assert [t["id"] for t in reader.list_tasks(None, 10)] == [c, b, a]
    assert [t["id"] for t in reader.list_tasks(QUEUED, 10)] == [c, a]
    page = reader.board(task_id="00000002")
    assert {t["id"] for col in page["columns"] for t in col["tasks"]} == {b, c}

    # ... and where two shown tasks share their last 8 characters, both show more (as git does)
    assert ids.short_ids([a, b, c]) == {a: "00000001", b: "c9d000000002", c: "ffff00000002"}
    assert ids.short_id(a) == "00000001"


def test_kept_arguments_are_bounded_oldest_first_and_taken_once():
    """What a store keeps of new tasks' arguments (for their Runs) stays within its bounds."""
    kept = KeptArgs()
    kept.LIMIT_TASKS, kept.LIMIT_BYTES = 3, 10
    for task_id in "abcd":
        kept.keep(task_id, task_id.encode())
    assert kept.take("a") is None  # the oldest went when a fourth came
    assert kept.take("b") == b"b" and kept.take("b") is None  # taken once: then read from the store
    kept.keep("x", b"123456")
    kept.keep("y", b"123456")  # 12 bytes with x: x goes (and c, d before it, oldest first)
    assert [kept.take(t) for t in "cdxy"] == [None, None, None, b"123456"]
    kept.keep("z", b"1")
    kept.keep("z", b"22")  # kept again (a released workflow step): the new bytes, counted once
    assert kept.take("z") == b"22"

