"""A workflow on the task board is one card (SPEC section 8, issue 20): in Running until it ends,
then in its record's state, with its kind, its steps per state and the running ones named; its
steps are in no column (the columns count cards, and say how many steps they hold), a filter
that matches a step finds its workflow, and a step still opens on its own. On both stores (the
store marks steps with ``tasks.flow_id``, written with the workflow's ``flow`` event, schema 3;
a store of schema 2 gets it from the events it has). One test drives headless Chromium."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, wait_until
from test_board_browser import browser, click, open_board, text  # noqa: F401 (browser: a fixture)
from test_ui import Client

import capsule_actors as cpsl
from capsule_actors import store, testing
from capsule_actors.flows import FLOW_TASK
from capsule_actors.states import TaskState
from capsule_actors.ui import TaskBoard

STORES = ("sqlite", "postgresql")  # the board reads either store
MEMBERS = 20

app = cpsl.App("flow-board")


# ---- tasks (module level: the registry travels to the supervisor) -----------------------------


@app.task
async def member(i: int, gate: str) -> int:
    """A chord member that runs until the file ``gate`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return i


@app.task
async def total(values: list[int]) -> int:
    return sum(values)


@app.task
async def plain(x: int) -> int:
    return x


@app.task
async def refuse(x: int) -> int:
    raise ValueError(f"no {x}")


# ---- helpers ---------------------------------------------------------------------------------


def columns(client: Client, query: str = "") -> dict[str, dict[str, Any]]:
    status, data = client.json("GET", "/api/board" + query)
    assert status == 200, data
    return {c["state"]: c for c in data["columns"]}


def card_ids(cols: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every card's id -> the column it is in."""
    return {t["id"]: state for state, col in cols.items() for t in col["tasks"]}


def steps_in(cols: dict[str, dict[str, Any]]) -> int:
    return sum(col["steps"] for col in cols.values())


@pytest.fixture
def board_client(state_dir: Path) -> Iterator[Any]:
    """board_client(app) -> a Client of a TaskBoard served in this process; stopped at teardown."""
    boards: list[TaskBoard] = []

    def _make(target: Any) -> Client:
        board = TaskBoard(target, page_size=50).start()
        boards.append(board)
        return Client(board.port, board.token)

    yield _make
    for board in boards:
        board.stop()


# ---- the board's data ------------------------------------------------------------------------


def test_a_chord_is_one_card_that_counts_its_steps_and_ends_in_succeeded(start, board_client, state_dir, tmp_path):
    # Given a chord of 20 members held running by a gate, and a plain task that ends at once
    start(app)
    gate = tmp_path / "gate"
    flow = cpsl.chord([member.s(i, str(gate)) for i in range(MEMBERS)], total.s()).submit()
    single = plain.submit(7)
    assert single.result(timeout=30) == 7
    steps = flow.steps()
    assert len(steps) == MEMBERS + 1
    wait_until(lambda: any(s.status() is TaskState.RUNNING for s in steps), 30)
    client = board_client(app)

    # Then the board holds two cards: the workflow in Running, the plain task in Succeeded
    cols = columns(client)
    assert card_ids(cols) == {flow.id: "RUNNING", single.id: "SUCCEEDED"}
    assert {s: c["count"] for s, c in cols.items()} == {
        "QUEUED": 0,
        "SCHEDULED": 0,
        "RUNNING": 1,
        "SUCCEEDED": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    card = cols["RUNNING"]["tasks"][0]
    assert card["name"] == FLOW_TASK and card["state"] == "RUNNING" and card["record_state"] == "SCHEDULED"
    f = card["flow"]
    assert f["kind"] == "chord" and f["steps"] == MEMBERS + 1
    assert sum(f["states"].values()) == MEMBERS + 1
    assert f["states"].get("RUNNING", 0) >= 1 and f["states"].get("SCHEDULED") == 1  # the callback waits
    running_ids = {s.id for s in steps if s.info().state is TaskState.RUNNING}
    assert f["running"] and {r["id"] for r in f["running"]} <= running_ids
    assert all(r["name"] == "member" for r in f["running"]) and len(f["running"]) <= store.base.BOARD_RUNNING_STEPS
    # ... and each column says how many steps it holds inside workflow cards (all 21, once)
    assert steps_in(cols) == MEMBERS + 1 and cols["SCHEDULED"]["steps"] == 1

    # ... a filter that matches only steps finds their workflow (name, or a step's short id)
    assert card_ids(columns(client, "?name=member")) == {flow.id: "RUNNING"}
    assert card_ids(columns(client, f"?id={steps[5].id[-8:]}")) == {flow.id: "RUNNING"}
    assert card_ids(columns(client, "?name=plain")) == {single.id: "SUCCEEDED"}
    by_name = columns(client, "?name=total")
    assert steps_in(by_name) == 1 and by_name["SCHEDULED"]["steps"] == 1

    # ... and the workflow's detail opens into its steps, a step's own detail names its workflow
    status, detail = client.json("GET", f"/api/tasks/{flow.id}")
    assert status == 200 and detail["state"] == "RUNNING" and detail["flow"]["kind"] == "chord"
    assert [r["id"] for r in detail["flow"]["step_rows"]] == [s.id for s in steps]
    status, step = client.json("GET", f"/api/tasks/{steps[0].id}")
    assert status == 200 and step["name"] == "member" and step["flow_id"] == flow.id

    # When the gate opens and the chord ends
    gate.touch()
    assert flow.result(timeout=60) == sum(range(MEMBERS))

    # Then its card is in Succeeded with every step succeeded, and no step has a card
    cols = columns(client)
    assert card_ids(cols) == {flow.id: "SUCCEEDED", single.id: "SUCCEEDED"}
    assert cols["SUCCEEDED"]["count"] == 2 and cols["SUCCEEDED"]["steps"] == MEMBERS + 1
    card = next(t for t in cols["SUCCEEDED"]["tasks"] if t["id"] == flow.id)
    assert card["state"] == "SUCCEEDED" and "record_state" not in card
    assert card["flow"]["states"] == {"SUCCEEDED": MEMBERS + 1} and card["flow"]["running"] == []
    status, detail = client.json("GET", f"/api/tasks/{flow.id}")
    assert [r["state"] for r in detail["flow"]["step_rows"]] == ["SUCCEEDED"] * (MEMBERS + 1)

    # ... and `capsule-actors tasks` still lists the workflow as one line with its steps below
    out = cli("tasks", "--limit", "100", state_dir=state_dir, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"flow: {MEMBERS + 1} steps, 0 running" in out.stdout
    assert out.stdout.count("└") == MEMBERS + 1


def test_a_failed_step_puts_the_workflow_card_in_failed_with_its_error(start, board_client, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    gate.touch()
    flow = cpsl.chain(member.s(1, str(gate)), refuse.s()).submit()
    with pytest.raises(ValueError, match="no 1"):
        flow.result(timeout=30)
    cols = columns(board_client(app))
    assert card_ids(cols) == {flow.id: "FAILED"}
    card = cols["FAILED"]["tasks"][0]
    assert card["flow"]["kind"] == "chain" and card["flow"]["states"] == {"SUCCEEDED": 1, "FAILED": 1}
    assert "no 1" in card["error"] and cols["FAILED"]["steps"] == 1 and cols["SUCCEEDED"]["steps"] == 1


# ---- the store -------------------------------------------------------------------------------


def _record_chord(db: Any, flow_id: str, members: list[str], callback: str) -> None:
    """A chord as the supervisor records it: its rows, then the record's ``flow`` event."""
    now = time.time()

    def row(task_id: str, name: str, state: TaskState) -> store.NewTask:
        return store.NewTask(task_id, name, state, None, None, None, b"\x80\x05N.", now, None)

    db.begin()
    db.insert_tasks(
        [row(m, "member", TaskState.QUEUED) for m in members]
        + [row(callback, "total", TaskState.SCHEDULED), row(flow_id, FLOW_TASK, TaskState.SCHEDULED)]
    )
    db.add_event(
        flow_id,
        None,
        "flow",
        {"steps": [*members, callback], "inputs": {callback: members}, "on_error": None, "value": callback},
    )
    db.insert_tasks([row("lone", "plain", TaskState.QUEUED)])
    db.commit()


def test_a_schema_2_store_learns_its_workflows_steps_from_their_events(store_kind, task_store_factory, store_reader):
    db = task_store_factory()
    members = [f"m{i}" for i in range(5)]
    _record_chord(db, "flow1", members, "cb")
    if store_kind == "sqlite":  # back to what schema 2 was
        db.db.executescript(  # type: ignore[attr-defined]
            "DROP INDEX tasks_flow; ALTER TABLE tasks DROP COLUMN flow_id; "
            "UPDATE meta SET value='2' WHERE key='schema_version';"
        )
    else:
        s = db.schema  # type: ignore[attr-defined]
        db.db.execute(f"ALTER TABLE {s}.tasks DROP COLUMN flow_id")  # type: ignore[attr-defined]
        db.db.execute(f"UPDATE {s}.meta SET value='2' WHERE key='schema_version'")  # type: ignore[attr-defined]
        db.db.commit()  # type: ignore[attr-defined]
    db.close()
    task_store_factory().close()  # opened by a supervisor of schema 3

    board = store_reader().board()
    cols = {c["state"]: c for c in board["columns"]}
    assert {t["id"]: c for c, col in cols.items() for t in col["tasks"]} == {"flow1": "RUNNING", "lone": "QUEUED"}
    assert cols["QUEUED"]["steps"] == 5 and cols["SCHEDULED"]["steps"] == 1 and cols["SCHEDULED"]["count"] == 0
    card = cols["RUNNING"]["tasks"][0]
    assert card["flow"]["steps"] == 6 and card["flow"]["kind"] == "chord"
    assert store_reader().task_detail("m3")["flow_id"] == "flow1"  # type: ignore[index]


def test_a_workflow_whose_event_was_pruned_still_opens_into_its_steps(task_store, store_reader):
    _record_chord(task_store, "flow1", ["a", "b"], "cb")
    task_store.begin()
    task_store.prune_events(time.time() + 1, 0, 1000)  # retention: every event goes
    task_store.commit()
    rows = store_reader().flow_steps("flow1")
    assert rows is not None and [r["id"] for r in rows["step_rows"]] == ["a", "b", "cb"]
    assert store_reader().flow_steps("lone") is None


def test_the_store_knows_the_flow_records_name():
    assert store.FLOW_RECORD == FLOW_TASK


# ---- in the browser --------------------------------------------------------------------------


@pytest.fixture
def served(state_dir: Path) -> Iterator[dict[str, Any]]:
    """A runtime on SQLite and its board, served in this process; both stopped at teardown."""
    with testing.start_runtime(app, state_dir, timeout=110.0):
        board = TaskBoard(app).start()
        try:
            yield {"url": board.url}
        finally:
            board.stop()


def test_the_workflow_card_shows_its_progress_and_opens_into_its_steps(browser, served, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    driver = browser
    gate = tmp_path / "gate"
    flow = cpsl.chord([member.s(i, str(gate)) for i in range(MEMBERS)], total.s()).submit()
    steps = flow.steps()
    wait_until(lambda: any(s.status() is TaskState.RUNNING for s in steps), 30)
    open_board(driver, served["url"])

    # The chord is one card in Running: its kind and size, steps per state, the running ones named
    selector = f'#col-RUNNING .cpsl-card.cpsl-flow[data-task-id="{flow.id}"]'
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, selector), timeout=20)
    assert text(driver, selector + " .cpsl-name") == f"chord: {MEMBERS + 1} steps"
    summary = text(driver, selector + " .cpsl-flow-sum")
    assert "running" in summary and summary.endswith("waiting"), summary  # the callback waits
    assert "\u25b6 member" in text(driver, selector + " .cpsl-flow-running")
    assert not driver.find_elements(By.CSS_SELECTOR, f'.cpsl-card[data-task-id="{steps[0].id}"]')
    assert len(driver.find_elements(By.CSS_SELECTOR, ".cpsl-card")) == 1
    assert text(driver, "#col-RUNNING .count") == "1"
    assert "in workflows" in text(driver, "#col-QUEUED .steps") + text(driver, "#col-SCHEDULED .steps")

    # It opens into its steps, the running ones marked; a step opens its own detail
    click(driver, selector + " .cpsl-name")
    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#d-steps tr.cpsl-step")) == MEMBERS + 1, timeout=20)
    assert text(driver, "#d-title") == "chord (workflow)"
    assert driver.find_elements(By.CSS_SELECTOR, "#d-steps tr.running")

    # ... and follows the steps live: once the gate opens, the card moves to Succeeded, all done
    gate.touch()
    assert flow.result(timeout=60) == sum(range(MEMBERS))
    done = f'#col-SUCCEEDED .cpsl-card.cpsl-flow[data-task-id="{flow.id}"]'
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, done), timeout=20)
    wait_until(lambda: text(driver, done + " .cpsl-flow-sum") == f"{MEMBERS + 1} done", timeout=20)
    wait_until(lambda: text(driver, "#detail h3") == f"Steps ({MEMBERS + 1}, 0 running)", timeout=20)
    assert not driver.find_elements(By.CSS_SELECTOR, "#d-steps tr.running")
    click(driver, f'#d-steps a[data-open="{steps[0].id}"]')
    wait_until(lambda: text(driver, "#d-title") == "member" and flow.id in text(driver, "#d-flow"), timeout=20)
