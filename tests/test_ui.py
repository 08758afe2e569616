"""Task UI without a browser (SPEC section 2 "Task UI", section 3 `board`): TaskCard as text and
HTML (from handles, records and the card events of ``session.show_task``); the board's HTTP
surface (token on every request, POST-only actions, live feed over server-sent events, reads
that never unpickle, 5,000 tasks paged); ``capsule-actors board``, the tables of ``tasks`` and
``status``, and the progress bar of ``submit --wait``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli, kill_tree, wait_until

import capsule_actors as cpsl
from capsule_actors.ui import TaskBoard, TaskCard
from capsule_actors.ui.card import format_duration, progress_bar

STORES = ("sqlite", "postgresql")  # the board reads either store

app = cpsl.App("ui-test")
TESTS = Path(__file__).resolve().parent
URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_\-]+)")


# ---- tasks (module level: the registry travels to the supervisor) -----------------------------

@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def boom(text: str = "kaboom") -> None:
    raise ValueError(text)


@app.task
async def gated(gate: str, session: cpsl.Session | None = None) -> str:
    """Runs until the file ``gate`` exists (reporting 50% meanwhile when it has a session)."""
    if session is not None:
        session.report_progress(0.5, "half way")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return "opened"


@app.task
async def gated_after(prev: int, gate: str) -> int:
    """A workflow step that runs until the file ``gate`` exists."""
    await gated(gate)
    return prev


@app.task
async def shower(handle: cpsl.TaskHandle, session: cpsl.Session | None = None) -> str:
    """Shows another task's card in this task's session."""
    await session.show_task(handle)
    return handle.id


@app.task
async def steps(n: int = 4, session: cpsl.Session | None = None) -> str:
    for i in range(1, n + 1):
        await asyncio.sleep(0.15)
        session.report_progress(i / n, f"step {i}")
    return "done"


class Tripwire:
    """Unpickling it creates a file: proof of who unpickled an argument."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_trip, (self.path,))


def _trip(path: str) -> str:
    Path(path).write_text("unpickled")
    return path


# ---- TaskCard ------------------------------------------------------------------------------

CARD = {"card": "0123456789abcdef", "task_id": "0123456789abcdef", "name": "build_report", "state": "RUNNING",
        "attempts": 2, "progress": 0.5, "error": None, "created_at": 1000.0, "started_at": 1010.0,
        "finished_at": None}


def test_card_from_card_event_data_renders_text_and_html():
    card = TaskCard(CARD)
    assert (card.id, card.name, card.state, card.attempts, card.progress) == (
        "0123456789abcdef", "build_report", cpsl.TaskState.RUNNING, 2, 0.5)
    text = card.text(now=1013.25)
    assert text.splitlines() == [
        "build_report  RUNNING  attempt 2  id 89abcdef",
        "[##########----------]  50%  elapsed 3.2s",
    ]
    assert str(card) == card.text() and "█" in card.text(unicode=True)
    html = card.html(now=1013.25)
    assert html.startswith("<style>") and ".cpsl-card" in html
    assert 'class="cpsl-card cpsl-RUNNING"' in html and 'data-card="0123456789abcdef"' in html
    assert 'aria-valuenow="50"' in html and "width:50%" in html and "elapsed 3.2s" in html
    assert "<style>" not in card.html(styles=False) and card._repr_html_() == card.html()


def test_card_updates_keep_the_card_id_and_show_the_error_or_result():
    card = TaskCard(CARD)
    failed = card.updated({"card": CARD["card"], "state": "FAILED", "error": "ValueError: <b>bad</b>",
                           "finished_at": 1020.0, "update": True})
    assert failed.id == card.id and failed.state is cpsl.TaskState.FAILED
    assert failed.elapsed() == pytest.approx(10.0)
    assert failed.text().splitlines()[-1] == "error: ValueError: <b>bad</b>"
    html = failed.html()
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "<b>bad</b>" not in html  # escaped
    ok = card.updated({"state": "SUCCEEDED", "finished_at": 1011.0, "result": "'report.pdf'"})
    assert ok.progress == 1.0 and ok.text().splitlines()[-1] == "result: 'report.pdf'"
    assert "100%" in ok.text()
    queued = TaskCard({**CARD, "state": "QUEUED", "started_at": None, "progress": None})
    assert "waiting 13.0s" in queued.text(now=1013.0) and "  ?%" in queued.text(now=1013.0)
    assert TaskCard(card.to_dict()) == card


def test_card_escapes_names_and_rejects_unknown_sources():
    evil = TaskCard({**CARD, "name": '<script>alert("x")</script>'})
    assert "<script>alert" not in evil.html(styles=False)
    with pytest.raises(TypeError):
        TaskCard(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TaskCard({"name": "no id"})


def test_small_formatters():
    assert [format_duration(s) for s in (None, 0.04, 12.34, 245, 7380, 2 * 86400 + 3600)] == [
        "-", "0.0s", "12.3s", "4m05s", "2h03m", "2d01h"]
    assert progress_bar(None, 4) == "[----]" and progress_bar(0.5, 4) == "[##--]" and progress_bar(2, 4) == "[####]"


def test_import_stays_light_without_the_web_stack():
    code = ("import sys, capsule_actors as c; c.ui.TaskCard; c.ui.TaskBoard; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'anyio')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cards_from_handles_and_from_show_task_events(start, tmp_path):
    start(app)
    # Given tasks that succeeded and failed, cards built from their handles say so
    h = add.submit(2, 3)
    assert h.result(timeout=30) == 5
    card = TaskCard(h)
    assert card.state is cpsl.TaskState.SUCCEEDED and card.result == "5" and card.attempts == 1
    assert "result: 5" in card.text() and "cpsl-SUCCEEDED" in card.html()
    bad = boom.submit("no good")
    with pytest.raises(ValueError):
        bad.result(timeout=30)
    assert "error: ValueError: no good" in TaskCard(bad).text()

    # When a task shows another task's card in its session
    gate = tmp_path / "gate"
    target = gated.submit(str(gate))
    wait_until(lambda: target.status() is cpsl.TaskState.RUNNING)
    assert shower.submit(target, session=cpsl.Session("chat-ui")).result(timeout=30) == target.id
    gate.touch()
    assert target.result(timeout=30) == "opened"

    # Then the card event and its later update carry the same card id, and render
    cards = [TaskCard(e) for e in target.events() if e.kind == "card"]
    assert len(cards) >= 2
    assert {c.id for c in cards} == {target.id}
    assert cards[0].state is cpsl.TaskState.RUNNING and cards[-1].state is cpsl.TaskState.SUCCEEDED
    assert "gated  SUCCEEDED" in cards[-1].text()
    merged = cards[0].updated([e for e in target.events() if e.kind == "card"][-1])
    assert merged.state is cpsl.TaskState.SUCCEEDED and merged.id == target.id


# ---- the board over HTTP -------------------------------------------------------------------

class Client:
    """Plain http.client requests to a board (no browser), bounded by a socket timeout."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                auth: bool = True) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            hdrs = dict(headers or {})
            if auth:
                hdrs.setdefault("X-Capsule-Token", self.token)
            conn.request(method, path, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request(method, path, **kw)
        return status, json.loads(body) if body else None


@pytest.fixture
def board_of(state_dir: Path) -> Iterator[Any]:
    """board_of(app_or_dir, **kw) -> a started TaskBoard and its Client; stopped at teardown."""
    boards: list[TaskBoard] = []

    def _make(target: Any = None, **kw: Any) -> tuple[TaskBoard, Client]:
        board = TaskBoard(target if target is not None else state_dir, **kw).start()
        boards.append(board)
        return board, Client(board.port, board.token)

    yield _make
    for board in boards:
        board.stop()


ROUTES = [("GET", "/"), ("GET", "/static/board.js"), ("GET", "/api/board"), ("GET", "/api/stream"),
          ("GET", "/api/tasks/{id}"), ("POST", "/api/tasks/{id}/cancel"), ("POST", "/api/tasks/{id}/retry"),
          ("GET", "/stats"), ("GET", "/static/stats.js"), ("GET", "/api/stats?window=hour")]


def test_every_request_needs_the_token_and_actions_are_post(start, board_of, state_dir, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    h = gated.submit(str(gate))
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING)
    board, client = board_of(app)
    assert board.url == f"http://127.0.0.1:{board.port}/?token={board.token}"
    assert len(board.token) >= 40

    # Without a token every route answers 401, with a wrong one 403: page, data and actions
    for method, path in ROUTES:
        path = path.format(id=h.id)
        assert client.request(method, path, auth=False)[0] == 401, path
        assert client.request(method, path, {"X-Capsule-Token": "x" * 43})[0] == 403, path
        assert client.request(method, path + ("&" if "?" in path else "?") + "token=wrong", auth=False)[0] == 403
        cookie = {"Cookie": f"capsule_board_{board.port}=wrong"}
        assert client.request(method, path, cookie, auth=False)[0] == 403, path
    assert h.status() is cpsl.TaskState.RUNNING  # nothing was cancelled on the way

    # The first page load with ?token= sets an HttpOnly SameSite=Strict cookie and drops the token
    status, headers, _ = client.request("GET", f"/?token={board.token}", auth=False)
    assert status == 303 and headers["location"] == "/"
    cookie_header = headers["set-cookie"]
    assert cookie_header.startswith(f"capsule_board_{board.port}={board.token}")
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header
    jar = {"Cookie": cookie_header.split(";")[0]}
    status, headers, page = client.request("GET", "/", jar, auth=False)
    assert status == 200 and b"<title>capsule-actors board" in page
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"
    for col in ("Queued", "Scheduled", "Running", "Succeeded", "Failed", "Cancelled"):
        assert f"<h2>{col}".encode() in page
    assert client.request("GET", "/api/board", {"Authorization": f"Bearer {board.token}"}, auth=False)[0] == 200
    status, _, page = client.request("GET", "/stats", jar, auth=False)
    assert status == 200 and b"<title>capsule-actors stats" in page
    assert client.request("GET", "/api/stats?window=week", jar, auth=False)[0] == 400

    # A request for another host name (DNS rebinding) and a cross-origin POST are refused
    assert client.request("GET", "/api/board", {"Host": f"evil.example:{board.port}"})[0] == 403
    cross = {**jar, "Origin": "http://evil.example"}
    assert client.request("POST", f"/api/tasks/{h.id}/cancel", cross, auth=False)[0] == 403
    assert h.status() is cpsl.TaskState.RUNNING

    # Actions are POST only
    assert client.request("GET", f"/api/tasks/{h.id}/cancel")[0] == 405

    # With the token: cancel works (once), retry of a live task is refused, retry of a finished one works
    assert client.json("POST", f"/api/tasks/{h.id}/retry")[0] == 409
    status, body = client.json("POST", f"/api/tasks/{h.id}/cancel", headers={**jar, "Origin": f"http://127.0.0.1:{board.port}"},
                               auth=False)
    assert status == 200 and body == {"ok": True, "cancelled": True, "task_id": h.id}
    assert h.status() is cpsl.TaskState.CANCELLED
    assert client.json("POST", f"/api/tasks/{h.id}/cancel")[1]["cancelled"] is False
    gate.touch()
    status, body = client.json("POST", f"/api/tasks/{h.id}/retry")
    assert status == 200 and body["retry_of"] == h.id and body["task_id"] != h.id
    again = cpsl.TaskHandle.from_id(app, body["task_id"])
    assert again.name == "gated" and again.result(timeout=30) == "opened"
    assert client.json("POST", "/api/tasks/" + "0" * 32 + "/cancel")[0] == 404
    assert client.json("GET", "/api/tasks/" + "0" * 32)[0] == 404


def test_detail_shows_sizes_traceback_and_events_and_never_unpickles(start, board_of, tmp_path):
    start(app)
    bad = boom.submit("detail please")
    with pytest.raises(ValueError):
        bad.result(timeout=30)
    tripwire = tmp_path / "unpickled"
    later = add.schedule(Tripwire(str(tripwire)), 1, delay=3600)  # never runs during the test
    _, client = board_of(app)

    status, detail = client.json("GET", f"/api/tasks/{bad.id}")
    assert status == 200
    assert detail["state"] == "FAILED" and detail["attempts"] == 1
    assert detail["error"] == "ValueError: detail please"
    assert "ValueError: detail please" in detail["traceback"] and "Traceback" in detail["traceback"]
    assert [e["data"]["state"] for e in detail["events"] if e["kind"] == "state"] == ["QUEUED", "RUNNING", "FAILED"]
    assert detail["args"]["bytes"] > 0 and detail["args"]["format"] == "cloudpickle"

    status, detail = client.json("GET", f"/api/tasks/{later.id}")
    assert status == 200 and detail["state"] == "SCHEDULED" and detail["run_at"] > time.time() + 3000
    assert detail["args"]["bytes"] > 0 and detail["result"] is None
    assert "Tripwire" not in json.dumps(detail)
    status, data = client.json("GET", "/api/board")
    assert [t["id"] for t in data["columns"][1]["tasks"]] == [later.id]
    assert not tripwire.exists()  # the board showed the task without unpickling its arguments
    assert later.cancel()


def _read_sse(resp: http.client.HTTPResponse, want: str, deadline: float) -> dict[str, Any]:
    event = None
    while time.monotonic() < deadline:
        line = resp.readline().decode()
        if not line:
            break
        line = line.rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == want:
            return json.loads(line[6:])
    pytest.fail(f"no {want!r} event on the stream in time")


def test_live_feed_pushes_every_change_as_server_sent_events(start, board_of):
    start(app)
    board, _ = board_of(app)
    conn = http.client.HTTPConnection("127.0.0.1", board.port, timeout=20)
    try:
        conn.request("GET", "/api/stream", headers={"X-Capsule-Token": board.token})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
        hello = _read_sse(resp, "hello", time.monotonic() + 20)
        assert hello["seq"] >= 0
        h = add.submit(20, 22)
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while h.id not in seen:
            seen.update(_read_sse(resp, "tasks", deadline)["ids"])
        assert h.result(timeout=30) == 42
    finally:
        conn.close()


def _fill(state_dir: Path, store_url: str | None, n: int) -> dict[str, int]:
    """n task records spread over the six states, written through the store as a supervisor
    would have (the store remembered for the state directory, so a board given it finds them)."""
    from capsule_actors import store
    from capsule_actors.states import TaskState

    states = ["SUCCEEDED"] * 6 + ["FAILED", "CANCELLED", "QUEUED", "RUNNING", "SCHEDULED"]
    now = time.time()
    counts = dict.fromkeys(("QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"), 0)
    db = store.open_store(state_dir, store_url, "ui-fill")
    try:
        db.begin()
        for i in range(n):
            state = TaskState(states[i % len(states)])
            counts[state.value] += 1
            first = TaskState.SCHEDULED if state is TaskState.SCHEDULED else TaskState.QUEUED
            run_at = now + 3600 if state is TaskState.SCHEDULED else None
            task_id = f"{i:032x}"
            db.insert_tasks([store.NewTask(task_id, f"job{i % 5}", first, f"key{i % 7}" if i % 2 else None,
                                           f"chat-{i % 3}", None, b"\x80\x05x" * 10, now - n + i, run_at)])
            if state in (TaskState.QUEUED, TaskState.SCHEDULED):
                continue
            db.mark_running(task_id, None, 1, "w0", now - n + i + 1)
            db.set_progress(task_id, (i % 10) / 10)
            if state.terminal:
                error = ("ValueError", "bad", "") if state is TaskState.FAILED else None
                db.finish(task_id, None, state, None, error, now - n + i + 2)
        db.commit()
    finally:
        db.close()
    store.remember(state_dir, store_url, "ui-fill")
    return counts


def test_board_stays_responsive_with_5000_tasks_and_pages_the_columns(board_of, state_dir, store_url):
    # Given 5,000 tasks in a store whose supervisor is not running (the board reads the store directly)
    state_dir.mkdir(parents=True)
    counts = _fill(state_dir, store_url, 5000)
    _, client = board_of(state_dir, page_size=50)

    # When the whole board is asked for, then each column holds one page and the true count, fast
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        status, _, raw = client.request("GET", "/api/board")
        timings.append(time.perf_counter() - t0)
        assert status == 200
    data = json.loads(raw)
    assert sorted(timings)[2] < 0.5, timings  # median well under half a second on 2 cores
    assert len(raw) < 200_000
    assert {c["state"]: c["count"] for c in data["columns"]} == counts and data["total"] == 5000
    assert all(len(c["tasks"]) == min(50, c["count"]) for c in data["columns"])
    assert data["online"] is False
    assert client.request("GET", "/")[0] == 200

    # ... finished columns are newest first, and the next page continues without overlap
    first = data["columns"][3]["tasks"]
    assert [t["finished_at"] for t in first] == sorted((t["finished_at"] for t in first), reverse=True)
    status, second = client.json("GET", "/api/board?offset_SUCCEEDED=50")
    col = second["columns"][3]
    assert col["offset"] == 50 and len(col["tasks"]) == 50
    assert not {t["id"] for t in first} & {t["id"] for t in col["tasks"]}
    assert col["tasks"][0]["finished_at"] <= first[-1]["finished_at"]
    status, last = client.json("GET", "/api/board?offset_SUCCEEDED=999999")
    assert last["columns"][3]["offset"] == (counts["SUCCEEDED"] - 1) // 50 * 50

    # ... and the filters by name, session and lock key narrow every column and count
    status, narrow = client.json("GET", "/api/board?name=job3&session=chat-1&lock=key5")
    tasks = [t for c in narrow["columns"] for t in c["tasks"]]
    assert tasks and all(t["name"] == "job3" and t["session_id"] == "chat-1" and t["lock_key"] == "key5"
                         for t in tasks)
    assert narrow["total"] == sum(1 for i in range(5000) if i % 5 == 3 and i % 3 == 1 and i % 2 and i % 7 == 5)

    # ... and with no supervisor, actions say so instead of hanging
    status, body = client.json("POST", f"/api/tasks/{0:032x}/cancel")
    assert status == 503 and "capsule-actors run" in body["error"]


def test_board_needs_a_store_and_a_free_port(state_dir, board_of, store_url):
    with pytest.raises(cpsl.ConfigError, match="no task store"):
        TaskBoard(state_dir)
    state_dir.mkdir(parents=True)
    _fill(state_dir, store_url, 0)
    for bad in ("short", "x" * 20 + "; Path=/", "é" * 20):
        with pytest.raises(cpsl.ConfigError, match="token"):
            TaskBoard(state_dir, token=bad)
    board, client = board_of(state_dir, token="a-fixed-token-for-scripts")
    assert board.token == "a-fixed-token-for-scripts" and client.request("GET", "/api/board")[0] == 200
    with pytest.raises(cpsl.ConfigError, match="cannot listen"):
        TaskBoard(state_dir, port=board.port).start()


# ---- the command line ------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    env.pop("FORCE_COLOR", None)
    env.pop("NO_COLOR", None)
    return env


def read_url(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[str, int, str]:
    """The board URL that `capsule-actors board` prints first (bounded wait)."""
    deadline = time.monotonic() + timeout
    out = b""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            out += chunk
            m = URL_RE.search(out.decode(errors="replace"))
            if m:
                return m.group(0), int(m.group(1)), m.group(2)
        elif proc.poll() is not None:
            break
    err = proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""
    pytest.fail(f"`capsule-actors board` printed no URL within {timeout} s: {out!r} {err}")


def test_board_command_prints_its_url_refuses_without_token_and_stops_on_sigint(start, state_dir, procs):
    start(app)
    proc = subprocess.Popen([sys.executable, "-m", "capsule_actors", "board", "--port", "0",
                             "--state-dir", str(state_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), cwd=TESTS)
    procs.append(proc)
    _, port, token = read_url(proc)
    client = Client(port, token)
    assert client.request("GET", "/", auth=False)[0] == 401
    assert client.request("GET", "/api/board", auth=False)[0] == 401
    status, body = client.json("GET", "/api/board")
    assert status == 200 and len(body["columns"]) == 6

    # an open live stream does not keep the board from stopping
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        stream.request("GET", "/api/stream", headers={"X-Capsule-Token": token})
        resp = stream.getresponse()
        _read_sse(resp, "hello", time.monotonic() + 20)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        stream.close()


def test_board_command_without_a_store_fails_clearly(tmp_path):
    r = cli("board", "--port", "0", state_dir=tmp_path / "nothing-here", timeout=60)
    assert r.returncode == 1
    assert "no task store" in r.stderr and "Traceback" not in r.stderr


def test_tasks_and_status_tables_are_plain_when_piped_colored_when_forced(start, state_dir):
    start(app)
    ok = add.submit(1, 1)
    bad = boom.submit()
    ok.result(timeout=30)
    with pytest.raises(ValueError):
        bad.result(timeout=30)
    plain = cli("tasks", state_dir=state_dir, cwd=TESTS)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b[" not in plain.stdout
    lines = plain.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "ATTEMPTS", "PROGRESS", "CREATED", "ELAPSED", "LOCK", "ERROR"]
    state_col = lines[0].index("STATE")
    assert {line[state_col:].split()[0] for line in lines[1:]} == {"SUCCEEDED", "FAILED"}  # aligned
    assert "ValueError: kaboom" in plain.stdout

    env = dict(_env(), FORCE_COLOR="1")
    colored = subprocess.run([sys.executable, "-m", "capsule_actors", "tasks", "--state-dir", str(state_dir)],
                             capture_output=True, text=True, timeout=60, env=env, cwd=TESTS)
    assert "\x1b[32mSUCCEEDED\x1b[0m" in colored.stdout and "\x1b[31mFAILED\x1b[0m" in colored.stdout
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored.stdout).splitlines()[1:] == [
        line for line in plain.stdout.splitlines()[1:]]  # same layout, only colors added

    as_json = cli("tasks", "--json", state_dir=state_dir, cwd=TESTS)
    rows = json.loads(as_json.stdout)
    assert {r["id"] for r in rows} == {ok.id, bad.id} and "\x1b[" not in as_json.stdout
    assert set(rows[0]) >= {"id", "name", "state", "attempts", "lock_key", "error_type", "owner"}

    status = cli("status", state_dir=state_dir, cwd=TESTS)
    assert status.returncode == 0 and "\x1b[" not in status.stdout
    lines = status.stdout.splitlines()
    assert lines[0].startswith("supervisor pid") and lines[1].startswith("store ")
    assert lines[2].startswith("tasks: ") and lines[3].split()[:3] == ["SLOT", "ROLE", "PID"]
    forced = subprocess.run([sys.executable, "-m", "capsule_actors", "status", "--state-dir", str(state_dir)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=TESTS)
    assert "\x1b[32mready\x1b[0m" in forced.stdout
    assert json.loads(cli("status", "--json", state_dir=state_dir, cwd=TESTS).stdout)["actors"]


def test_submit_wait_draws_a_progress_bar_on_a_terminal_only(start, state_dir):
    start(app)
    cmd = [sys.executable, "-m", "capsule_actors", "submit", "test_ui:app", "steps", "[4]", "--session", "cli-1",
           "--wait", "--state-dir", str(state_dir)]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=_env(), cwd=TESTS)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == 0
    assert stdout.decode().strip() == '"done"'  # stdout keeps just the result
    drawn = out.decode(errors="replace")
    frames = [f for f in re.split(r"[\r\n]", drawn.replace("\x1b[2K", "")) if f.strip()]
    assert frames, drawn
    assert any(" 50%" in f or " 25%" in f or " 75%" in f for f in frames), frames
    assert "100%" in frames[-1] and "succeeded" in frames[-1] and "step 4" in frames[-1]
    assert "█" * 30 in frames[-1]

    # piped stderr: no bar at all
    piped = cli("submit", "test_ui:app", "steps", "[2]", "--session", "cli-2", "--wait", state_dir=state_dir, cwd=TESTS)
    assert (piped.returncode, piped.stdout.strip(), piped.stderr) == (0, '"done"', "")


def test_a_shown_card_follows_the_tasks_progress(start, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    target = gated.submit(str(gate), session=cpsl.Session("worker-session"))
    wait_until(lambda: target.info().progress == 0.5)
    shower.submit(target, session=cpsl.Session("chat-progress")).result(timeout=30)
    target_steps = steps.submit(session=cpsl.Session("steps-session"))
    shower.submit(target_steps, session=cpsl.Session("chat-progress")).result(timeout=30)
    assert target_steps.result(timeout=30) == "done"
    gate.touch()
    target.result(timeout=30)
    sub = iter(app.subscribe("chat-progress"))
    cards: list[cpsl.TaskEvent] = []
    wait_until(lambda: cards.append(next(sub)) or any(
        c.kind == "card" and c.task_id == target.id and c.data["state"] == "SUCCEEDED" for c in cards), timeout=20)
    progress = [c.data["progress"] for c in cards if c.kind == "card" and c.task_id == target_steps.id]
    # the steps task's card got an update per progress report, each with the new fraction
    assert [p for p in progress if p is not None][-1] == 1.0
    assert len({p for p in progress if p is not None}) >= 2
    assert next(c for c in cards if c.task_id == target.id and c.kind == "card").data["progress"] == 0.5


def test_tasks_of_one_second_have_short_ids_that_tell_them_apart(start, board_of, state_dir):
    start(app)
    # Given tasks submitted a few milliseconds apart: their ids start alike
    hs = [*add.map([(i, i) for i in range(4)]), add.submit(9, 9)]
    for h in hs:
        h.result(timeout=30)
    assert len({h.id[:8] for h in hs}) == 1

    # Then the table, the cards and the board's toasts show their last 8 characters: all different
    table = cli("tasks", state_dir=state_dir, cwd=TESTS)
    shown = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    assert shown == [h.id[-8:] for h in reversed(hs)] and len(set(shown)) == len(hs), table.stdout
    assert f"id {hs[0].id[-8:]}" in TaskCard(hs[0]).text()
    assert f">{hs[0].id[-8:]}</span>" in TaskCard(hs[0]).html(styles=False)

    # ... and the board finds a task by its short id (or any part of its id)
    _, client = board_of(app)
    for given in (hs[2].id[-8:], hs[2].id, hs[2].id[-8:].upper()):
        status, body = client.json("GET", f"/api/board?id={given}")
        assert status == 200 and [t["id"] for col in body["columns"] for t in col["tasks"]] == [hs[2].id], given
    status, body = client.json("POST", f"/api/tasks/{hs[1].id[-8:]}/retry")
    assert status == 200 and body["task_id"] != hs[1].id, body
    status, body = client.json("GET", f"/api/tasks/{hs[3].id[-8:]}")
    assert status == 200 and body["id"] == hs[3].id
    assert cpsl.TaskHandle.from_id(app, hs[3].id[-8:]).id == hs[3].id  # the API takes short ids too


def test_the_board_mounted_under_a_path_of_a_starlette_app_needs_its_token(start, state_dir, tmp_path):
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    start(app)
    gate = tmp_path / "gate"
    h = gated.submit(str(gate))
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING)

    # Given the board mounted at /tasks in an app of the user's own (which runs no board lifespan)
    board = TaskBoard(app)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the user's own app")

    host_app = Starlette(routes=[Route("/", home), Mount("/tasks", board.asgi())])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(host_app, log_level="warning", lifespan="off", http="h11",
                                           ws="none", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=15)
        client = Client(port, board.token)
        assert client.request("GET", "/", auth=False)[2] == b"the user's own app"

        # Then every board route under /tasks needs the token: 401 without, 403 wrong, 200 with it
        for method, path in ROUTES:
            path = "/tasks" + path.format(id=h.id)
            if method == "GET" and not path.endswith("stream"):
                assert client.request(method, path, auth=False)[0] == 401, path
                assert client.request(method, path, {"X-Capsule-Token": "x" * 43})[0] == 403, path
        status, data = client.json("GET", "/tasks/api/board")
        assert status == 200 and [t["id"] for t in data["columns"][2]["tasks"]] == [h.id]

        # ... the first load with ?token= keeps the page and its cookie under /tasks/
        status, headers, _ = client.request("GET", f"/tasks/?token={board.token}", auth=False)
        assert status == 303 and headers["location"] == "/tasks/"
        assert "Path=/tasks/;" in headers["set-cookie"]
        jar = {"Cookie": headers["set-cookie"].split(";")[0]}
        status, _, page = client.request("GET", "/tasks/", jar, auth=False)
        assert status == 200 and b'src="static/board.js"' in page and b'"/static' not in page
        assert client.request("GET", "/tasks/static/board.js", jar, auth=False)[0] == 200

        # ... the live feed runs (started by the first page that follows it) and actions work
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.request("GET", "/tasks/api/stream", headers={"X-Capsule-Token": board.token})
            resp = conn.getresponse()
            assert resp.status == 200
            _read_sse(resp, "hello", time.monotonic() + 20)
            status, body = client.json("POST", f"/tasks/api/tasks/{h.id[-8:]}/cancel")
            assert status == 200 and body["cancelled"] is True
            deadline = time.monotonic() + 20
            seen: set[str] = set()
            while h.id not in seen:
                seen.update(_read_sse(resp, "tasks", deadline)["ids"])
        finally:
            conn.close()
        assert h.status() is cpsl.TaskState.CANCELLED
    finally:
        server.should_exit = True
        thread.join(15)
        board.stop()
        gate.touch()


def test_a_workflow_opens_into_its_steps_with_the_running_one_marked(start, board_of, tmp_path):
    start(app)
    gate = tmp_path / "gate"
    flow = cpsl.chain(add.s(1, 2), gated_after.s(str(gate)), add.s(10)).submit()
    first, running, last = flow.steps()
    wait_until(lambda: running.status() == cpsl.TaskState.RUNNING, 30)
    _, client = board_of(app)
    status, detail = client.json("GET", f"/api/tasks/{flow.id}")
    assert status == 200 and detail["name"] == "capsule.flow"
    rows = detail["flow"]["step_rows"]
    assert [(r["id"], r["name"], r["state"]) for r in rows] == [
        (first.id, "add", "SUCCEEDED"),
        (running.id, "gated_after", "RUNNING"),
        (last.id, "add", "SCHEDULED"),  # waiting for its input
    ]
    assert detail["flow"]["inputs"] == {running.id: first.id, last.id: running.id}
    gate.touch()
    assert flow.result(timeout=30) == 13
    status, detail = client.json("GET", f"/api/tasks/{flow.id}")
    assert [r["state"] for r in detail["flow"]["step_rows"]] == ["SUCCEEDED"] * 3
    assert client.json("GET", f"/api/tasks/{first.id}")[1].get("flow") is None  # a step is a plain task
