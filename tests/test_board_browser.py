"""The task board in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven with Selenium against ``capsule-actors board`` and a real runtime.

A task moves Queued -> Running -> Succeeded on the open page without a reload; cancel without
the token is refused and with it works; retry, the detail view and the filters work; and a
screenshot of the board is saved to tests/artifacts/board.png (with
``CAPSULE_UPDATE_DOCS_SCREENSHOT=1`` also to docs/board.png, the README's picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, skip_or_fail, wait_until
from test_ui import _fill, read_url

import capsule_actors as cpsl
from capsule_actors import testing

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "tests" / "artifacts"
TESTS = ROOT / "tests"
WAIT = 20.0  # seconds: every wait on the page is bounded by this

app = cpsl.App("board-browser")


# ---- tasks (module level: the registry travels to the supervisor) -----------------------------

async def _wait_for(gate: str, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@app.task(lock="lane:{lane}", on_conflict="queue")
async def step(lane: str, gate: str) -> str:
    """One task at a time per lane; each runs until its gate file exists."""
    await _wait_for(gate)
    return f"{lane} passed"


@app.task
async def relay(prev: str, gate: str) -> str:
    """A workflow step: passes its input on, once the file ``gate`` exists (no gate: at once)."""
    if gate:
        await _wait_for(gate)
    return prev


@app.task
async def slow(seconds: float = 60.0) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.task
async def build_report(report_id: int, gate: str = "", session: cpsl.Session | None = None) -> str:
    if session is not None:
        session.report_progress(0.6, "rendering pages")
    if gate:
        await _wait_for(gate)
    return f"report-{report_id}.pdf"


@app.task
async def send_email(to: str) -> str:
    if "@" not in to:
        raise ValueError(f"not an address: {to!r}")
    return "sent"


LONG_NAME = "build_report_for_the_quarterly_board_meeting"


@app.task(name=LONG_NAME)
async def long_named(n: int) -> int:
    return n


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (both from Debian; Selenium Manager is not used)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        skip_or_fail(f"browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing; "
                     "`apt-get install chromium chromium-driver`, as .ci/run does)")
    try:
        from selenium import webdriver
    except ImportError:
        skip_or_fail("browser tests need selenium (the [test] extra)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cpsl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        with contextlib.suppress(Exception):
            service.stop()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def board(start: Callable[..., cpsl.Runtime], state_dir: Path) -> Iterator[dict[str, Any]]:
    """A runtime and `capsule-actors board --port 0` on its state dir; the board gets SIGINT at
    teardown (and SIGKILL if it does not stop in time)."""
    start(app)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "capsule_actors", "board", "--port", "0",
                             "--state-dir", str(state_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=TESTS)
    try:
        url, port, token = read_url(proc)
        yield {"url": url, "port": port, "token": token, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# ---- page helpers ----------------------------------------------------------------------------

def card_selector(state: str, task_id: str) -> str:
    return f'#col-{state} .cpsl-card[data-task-id="{task_id}"]'


def wait_card(driver: Any, state: str, task_id: str, timeout: float = WAIT) -> Any:
    """The task's card in the given column, as soon as the page shows it there."""
    from selenium.webdriver.common.by import By

    def find() -> Any:
        found = driver.find_elements(By.CSS_SELECTOR, card_selector(state, task_id))
        return found[0] if found else None

    return wait_until(find, timeout=timeout, interval=0.05)


def click(driver: Any, selector: str, timeout: float = WAIT) -> None:
    """Click what ``selector`` finds, finding it again if a live update replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt() -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return False
        try:
            found[0].click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(attempt, timeout=timeout, interval=0.05)


def click_until(driver: Any, selector: str, done: Callable[[], Any], timeout: float = WAIT) -> None:
    """Click, and click again every 2 s until ``done()``: a live update that replaces the element
    while the click lands swallows that click (for actions that may be repeated: a refused one)."""
    deadline = time.monotonic() + timeout
    while True:
        click(driver, selector, timeout=max(0.1, deadline - time.monotonic()))
        again = min(deadline, time.monotonic() + 2.0)
        while time.monotonic() < again:
            if done():
                return
            time.sleep(0.02)
        if time.monotonic() >= deadline:
            pytest.fail(f"{selector} clicked, but the page never showed the result within {timeout} s")


def where(driver: Any, task_id: str) -> str | None:
    """The column (state) that shows the task's card now, if any."""
    return driver.execute_script(
        "const c = document.querySelector('.cpsl-card[data-task-id=\"' + arguments[0] + '\"]');"
        "return c ? c.closest('.column').dataset.state : null;", task_id)


def text(driver: Any, selector: str) -> str:
    """An element's text, read inside the page (a live update may replace the element any time)."""
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", selector))


def toast_text(driver: Any) -> str:
    return driver.execute_script("const t = document.getElementById('toast'); return t.hidden ? '' : t.textContent;")


def transitions_done(driver: Any) -> bool:
    """No CSS transition (a progress bar's width) or animation runs on the page, or is about to."""
    return bool(driver.execute_script("return document.getAnimations().length === 0;"))


def open_board(driver: Any, url: str) -> None:
    driver.get(url)  # ?token=... sets the cookie and redirects to /
    wait_until(lambda: driver.execute_script("return document.body.dataset.loaded === '1'"), timeout=WAIT)
    assert "token=" not in driver.current_url


# ---- tests -----------------------------------------------------------------------------------

def test_a_task_moves_queued_running_succeeded_on_the_open_page(browser, board, tmp_path):
    driver = browser
    open_board(driver, board["url"])
    driver.execute_script("window.__same_page = 'not reloaded';")
    gate_a, gate_b = tmp_path / "a", tmp_path / "b"

    # Given a task holding lane "x" and a second one queued behind it
    first = step.submit("x", str(gate_a))
    wait_until(lambda: first.status() is cpsl.TaskState.RUNNING)
    second = step.submit("x", str(gate_b))
    assert second.status() is cpsl.TaskState.QUEUED

    # Then, without a reload, the page shows the second one Queued, then Running, then Succeeded
    wait_card(driver, "QUEUED", second.id)
    wait_card(driver, "RUNNING", first.id)
    gate_a.touch()
    wait_card(driver, "SUCCEEDED", first.id)
    wait_card(driver, "RUNNING", second.id)
    assert where(driver, second.id) == "RUNNING"
    gate_b.touch()
    card = wait_card(driver, "SUCCEEDED", second.id)
    assert second.result(timeout=30) == "x passed"
    assert "SUCCEEDED" in card.get_attribute("textContent") and "step" in card.get_attribute("textContent")
    assert driver.execute_script("return window.__same_page") == "not reloaded"
    wait_until(lambda: driver.execute_script("return document.getElementById('live').classList.contains('on')"),
               timeout=WAIT)


def test_cancel_needs_the_token_retry_detail_and_filters_work(browser, board, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    bad = send_email.submit("nobody")
    with pytest.raises(ValueError):
        bad.result(timeout=30)
    h = slow.submit(60)
    wait_until(lambda: h.status() is cpsl.TaskState.RUNNING)
    open_board(driver, board["url"])
    wait_card(driver, "RUNNING", h.id)

    # When the page has lost its token (cookie gone) and Cancel is clicked, then it is refused
    driver.delete_all_cookies()
    cancel = card_selector("RUNNING", h.id) + " button[data-action=cancel]"
    click_until(driver, cancel, lambda: "401" in toast_text(driver))
    assert "refused" in toast_text(driver)
    # the board answers an action only once the supervisor has (a cancel is recorded before its
    # answer): the 401 came after anything the click could have done there
    assert h.status() is cpsl.TaskState.RUNNING

    # ... and a fresh page without the token gets nothing at all
    driver.get(f"http://127.0.0.1:{board['port']}/")
    assert "unauthorized" in driver.find_element(By.TAG_NAME, "body").text
    assert not driver.find_elements(By.CSS_SELECTOR, ".column")
    assert h.status() is cpsl.TaskState.RUNNING  # still, after a later request to the board

    # When the page is opened with the token and Cancel is clicked, then the task is cancelled
    open_board(driver, board["url"])
    wait_card(driver, "RUNNING", h.id)
    click(driver, card_selector("RUNNING", h.id) + " button[data-action=cancel]")
    wait_card(driver, "CANCELLED", h.id)
    assert h.status() is cpsl.TaskState.CANCELLED
    assert "Cancelled" in toast_text(driver)

    # ... and Retry submits it again with the same arguments
    click(driver, card_selector("CANCELLED", h.id) + " button[data-action=retry]")
    wait_until(lambda: "Retried" in toast_text(driver), timeout=WAIT)
    retried = wait_until(lambda: driver.execute_script(
        "return [...document.querySelectorAll('#col-RUNNING .cpsl-card, #col-QUEUED .cpsl-card')]"
        ".map((c) => c.dataset.taskId).filter((id) => id !== arguments[0]);", h.id), timeout=WAIT)
    again = cpsl.TaskHandle.from_id(app, retried[0])
    assert again.name == "slow" and again.id != h.id
    assert again.cancel()

    # The detail view of the failed task shows its error, traceback, arguments summary and events
    click(driver, card_selector("FAILED", bad.id) + " .cpsl-name")
    wait_until(lambda: driver.find_elements(By.ID, "d-traceback"), timeout=WAIT)
    assert "ValueError: not an address: 'nobody'" in text(driver, "#d-traceback")
    assert "pickled" in text(driver, "#d-args")
    events = text(driver, "#d-events")
    assert "QUEUED" in events and "RUNNING" in events and "FAILED" in events
    driver.find_element(By.ID, "d-close").click()

    # The name filter keeps only that task's cards
    driver.find_element(By.ID, "f-name").send_keys("send_email")
    wait_until(lambda: not driver.find_elements(By.CSS_SELECTOR, card_selector("CANCELLED", h.id)), timeout=WAIT)
    assert driver.find_elements(By.CSS_SELECTOR, card_selector("FAILED", bad.id))
    names = driver.execute_script(
        "return [...document.querySelectorAll('.cpsl-card .cpsl-name')].map((e) => e.textContent);")
    assert set(names) == {"send_email"}


def test_a_workflow_opens_into_its_steps_and_a_step_opens_its_task(browser, board, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    gate = str(tmp_path / "gate")
    flow = cpsl.chain(relay.s("x", ""), relay.s(gate), relay.s("")).submit()
    _first, running, _last = flow.steps()
    wait_until(lambda: running.status() is cpsl.TaskState.RUNNING)
    open_board(driver, board["url"])
    wait_card(driver, "RUNNING", flow.id)  # a workflow runs until its record ends
    click(driver, card_selector("RUNNING", flow.id) + " .cpsl-name")
    wait_until(lambda: driver.find_elements(By.ID, "d-steps"), timeout=WAIT)
    rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#d-steps tr.cpsl-step")]
    assert len(rows) == 3
    assert "SUCCEEDED" in rows[0] and "RUNNING \u25b6" in rows[1] and "SCHEDULED" in rows[2]
    assert driver.find_elements(By.CSS_SELECTOR, "#d-steps tr.running")
    click(driver, f'#d-steps a[data-open="{running.id}"]')
    wait_until(lambda: text(driver, "#d-title") == "relay" and running.id in text(driver, "#d-fields"), timeout=WAIT)
    Path(gate).touch()
    assert flow.result(timeout=30) == "x"


def test_screenshot_of_a_busy_board(browser, board, tmp_path):
    """A board with every column in use (and a chord running: one card), saved as tests/artifacts/board.png."""
    from selenium.webdriver.common.by import By

    driver = browser
    gate = tmp_path / "gate"
    handles = [build_report.submit(i) for i in (101, 102, 103)]
    handles += [send_email.submit("ops@example.com")]
    for h in handles:
        h.result(timeout=30)
    failed = send_email.submit("not-an-address")
    with pytest.raises(ValueError):
        failed.result(timeout=30)
    running = build_report.submit(7, str(gate), session=cpsl.Session("chat-42"))
    wait_until(lambda: (running.info().progress or 0) > 0.5)
    flow = cpsl.chord([relay.s(f"part {i}", str(gate)) for i in range(12)], relay.s("")).submit()
    wait_until(lambda: any(s.status() is cpsl.TaskState.RUNNING for s in flow.steps()))
    lane = tmp_path / "lane"
    holder = step.submit("nightly", str(lane))
    queued = step.submit("nightly", str(lane))
    later = build_report.schedule(9, delay=3600)
    cancelled = slow.submit(60)
    wait_until(lambda: cancelled.status() is cpsl.TaskState.RUNNING)
    assert cancelled.cancel()

    open_board(driver, board["url"])
    for state, h in (("SCHEDULED", later), ("RUNNING", running), ("QUEUED", queued), ("FAILED", failed),
                     ("CANCELLED", cancelled), ("SUCCEEDED", handles[0]), ("RUNNING", flow)):
        wait_card(driver, state, h.id)
    wait_until(lambda: transitions_done(driver), timeout=WAIT)  # the progress bars reached their width
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "board.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CAPSULE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "board.png")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".cpsl-card")) >= 8
    gate.touch()
    lane.touch()
    for h in (running, holder, queued, flow):
        h.result(timeout=30)
    assert later.cancel()


def test_a_board_of_5000_tasks_loads_fast_and_pages_in_the_browser(browser, state_dir):
    from selenium.webdriver.common.by import By

    from capsule_actors.ui import TaskBoard

    # Given 5,000 tasks in the store (and no supervisor running)
    state_dir.mkdir(parents=True)
    counts = _fill(state_dir, None, 5000)
    with TaskBoard(state_dir) as board:
        # When the page opens, then it is ready quickly and holds one page per column
        t0 = time.monotonic()
        open_board(browser, board.url)
        assert time.monotonic() - t0 < 10
        shown = browser.execute_script("return document.querySelectorAll('.cpsl-card').length")
        assert shown == sum(min(50, n) for n in counts.values())
        count = text(browser, "#col-SUCCEEDED .count")
        assert count.replace(",", "") == str(counts["SUCCEEDED"])
        pager = "#col-SUCCEEDED .pager"

        def pager_text() -> str:
            return text(browser, pager + " span")

        assert pager_text().startswith("1\u201350 of")
        first = browser.execute_script(
            "return document.querySelector('#col-SUCCEEDED .cpsl-card').dataset.taskId")

        # ... and the next page of a finished column replaces the first one
        click(browser, pager + " button[data-page='1']")
        wait_until(lambda: pager_text().startswith("51\u2013100"), timeout=WAIT)
        assert not browser.find_elements(By.CSS_SELECTOR, card_selector("SUCCEEDED", first))
        assert "offline" in text(browser, "#live")


def test_at_1280_px_cards_show_whole_names_and_short_ids_that_tell_tasks_apart(browser, board, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.set_window_size(1280, 900)
    # Given tasks submitted in the same millisecond or so (their ids start alike) with a long name
    done = long_named.map([1, 2, 3])
    for h in done:
        h.result(timeout=30)
    running = [slow.submit(60), slow.submit(60)]
    assert len({h.id[:8] for h in done + running}) <= 2
    for h in running:
        wait_until(lambda h=h: h.status() is cpsl.TaskState.RUNNING)
    open_board(driver, board["url"])
    for h in done:
        wait_card(driver, "SUCCEEDED", h.id)

    # Then each card shows the whole name, wrapped inside its card (nothing cut, nothing spilling)
    names = driver.execute_script(
        "return [...document.querySelectorAll('#col-SUCCEEDED .cpsl-name')].map((e) => {"
        "  const card = e.closest('.cpsl-card').getBoundingClientRect(), r = e.getBoundingClientRect();"
        "  return [e.innerText, e.scrollWidth <= e.clientWidth + 1, r.right <= card.right + 1]; });")
    assert names and all(n == [LONG_NAME, True, True] for n in names), names

    # ... and short ids, the ids' last 8 characters, all different
    shown = {h.id: text(driver, card_selector("SUCCEEDED", h.id) + " .cpsl-id") for h in done}
    assert shown == {h.id: h.id[-8:] for h in done}

    # When a task is cancelled, the toast names it by its short id
    wait_card(driver, "RUNNING", running[0].id)
    click(driver, card_selector("RUNNING", running[0].id) + " button[data-action=cancel]")
    wait_until(lambda: "Cancelled" in toast_text(driver), timeout=WAIT)
    assert toast_text(driver) == f"Cancelled {running[0].id[-8:]}"

    # ... and the id search finds one task by its short id
    driver.find_element(By.ID, "f-id").send_keys(done[1].id[-8:])
    wait_until(lambda: driver.execute_script(
        "return [...document.querySelectorAll('.cpsl-card')].map((c) => c.dataset.taskId);") == [done[1].id],
        timeout=WAIT)
    assert running[1].cancel()


# ---- the Stats view --------------------------------------------------------------------------
# The charts are redrawn (their elements made anew) every 5 s: read them inside the page, at once.

def attr(driver: Any, selector: str, name: str) -> str | None:
    """An attribute of what ``selector`` finds on the page now (None: not there)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        selector, name)


def attrs(driver: Any, selector: str, name: str) -> list[str]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.getAttribute(arguments[1]));",
        selector, name))


def chart_total(driver: Any, selector: str) -> float | None:
    """The data-total of what ``selector`` finds on the Stats page (None while it is not drawn)."""
    value = attr(driver, selector, "data-total")
    return None if value is None else float(value)


def points(driver: Any, selector: str) -> int:
    return len((attr(driver, selector, "points") or "").split())


def test_stats_view_draws_charts_that_change_after_tasks_run(browser, board):
    """The Stats view's charts are drawn from the store, and redraw with what ran since."""
    driver = browser
    # Given the Stats view open (reached from the board's link) before anything ran
    open_board(driver, board["url"])
    click(driver, "#to-stats")
    succeeded = '#chart-throughput polyline[data-series="SUCCEEDED"]'
    failed = '#chart-throughput polyline[data-series="FAILED"]'
    wait_until(lambda: chart_total(driver, succeeded) is not None, timeout=WAIT)
    assert chart_total(driver, succeeded) == 0 and chart_total(driver, failed) == 0
    assert not attrs(driver, "#chart-runtime rect", "data-task")
    assert (attr(driver, "#chart-restarts svg", "data-restarts"), attr(driver, "#chart-restarts svg", "data-crashes")) \
        == ("0", "0")
    assert points(driver, succeeded) == 60

    # When tasks succeed and fail
    for h in [send_email.submit("ops@example.com") for _ in range(6)]:
        assert h.result(timeout=30) == "sent"
    assert testing.join([build_report.submit(i) for i in range(3)] + long_named.map([1, 2]), timeout=30) == [
        "report-0.pdf", "report-1.pdf", "report-2.pdf", 1, 2]
    bad = send_email.submit("nobody")
    with pytest.raises(ValueError):
        bad.result(timeout=30)

    # Then, within a refresh (5 s), every chart shows them
    wait_until(lambda: round((chart_total(driver, succeeded) or 0) * 60) == 11, timeout=WAIT)
    wait_until(lambda: round((chart_total(driver, failed) or 0) * 60) == 1, timeout=WAIT)
    assert sorted(attrs(driver, '#chart-runtime rect[data-task="send_email"]', "data-q")) == ["p50", "p99"]
    assert set(attrs(driver, "#chart-runtime rect", "data-task")) == {"send_email", "build_report", LONG_NAME}
    assert attrs(driver, '#chart-queue polyline[data-series="send_email"]', "points")
    legend = driver.execute_script("return document.querySelector('#chart-throughput .legend').textContent")
    assert "SUCCEEDED" in legend and "FAILED" in legend

    # and the day's window redraws the same in 96 quarter hours
    click(driver, '#windows button[data-window="day"]')
    wait_until(lambda: points(driver, succeeded) == 96, timeout=WAIT)
    assert round((chart_total(driver, succeeded) or 0) * 900) == 11
    click(driver, '#windows button[data-window="hour"]')
    wait_until(lambda: points(driver, succeeded) == 60, timeout=WAIT)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "stats.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CAPSULE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "stats.png")
