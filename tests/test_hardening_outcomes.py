"""Issue 24, item 2: whatever a task raises or emits, what its actor sends fits the supervisor's
header limit, so every attempt ends (never RUNNING forever) and the supervisor stays healthy.
Real runtimes; every wait is bounded."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
from conftest import wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.errors import ProtocolError, SerializationError, TaskFailed
from capsule_actors.ui import TaskCard

app = cpsl.App("hardening-outcomes")
small_app = cpsl.App("hardening-outcomes-small", max_payload_bytes=1000)

HUGE = 600_000  # characters of the error message: twice that (message + traceback) passes 1 MiB
ERROR_BOUND = 16_384  # worker.MAX_ERROR_CHARS, kept here so the runtime tests import nothing new
TRACEBACK_BOUND = 65_536  # worker.MAX_TRACEBACK_CHARS
HEADER_LIMIT = 1 << 20
MARK = re.compile(r"\n\[capsule_actors: ([0-9,]+) characters cut\]\n")
WAIT = 20.0  # seconds: "promptly", with room for a busy machine


# ---- tasks --------------------------------------------------------------------------------


@app.task
async def raise_async(n: int) -> None:
    raise ValueError("x" * n)


@app.task
def raise_plain(n: int) -> None:
    raise ValueError("x" * n)


@app.task(process=True)
def raise_process(n: int) -> None:
    raise ValueError("x" * n)


RAISERS = {"async": raise_async, "plain": raise_plain, "process": raise_process}


@app.task
async def raise_long_type_name(n: int) -> None:
    raise type("E" * n, (Exception,), {})("a short message")


@app.task
async def raise_undecodable_name() -> None:
    raise ValueError("cannot read /data/caf\udce9.csv")  # os.fsdecode(b"caf\xe9"): a lone surrogate


@small_app.task
async def raise_small(n: int) -> None:
    raise ValueError("x" * n)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


def _oversend(session: cpsl.Session, n: int) -> list[str]:
    """Try a huge reply and a huge progress message; each must raise at the call."""
    caught = []
    for send in (lambda: session.reply("y" * n), lambda: session.report_progress(0.5, message="z" * n)):
        try:
            send()
        except SerializationError as exc:
            caught.append(str(exc))
    session.reply("still talking")
    return caught


@app.task
async def oversend_async(n: int, session: cpsl.Session | None = None) -> list[str]:
    assert session is not None
    return _oversend(session, n)


@app.task
def oversend_plain(n: int, session: cpsl.Session | None = None) -> list[str]:
    assert session is not None
    return _oversend(session, n)


@app.task(process=True)
def oversend_process(n: int, session: cpsl.Session | None = None) -> list[str]:
    assert session is not None
    return _oversend(session, n)


OVERSENDERS = {"async": oversend_async, "plain": oversend_plain, "process": oversend_process}


# ---- helpers ------------------------------------------------------------------------------


def failure(h: cpsl.TaskHandle) -> BaseException:
    """What result() raises, within WAIT seconds (a task left RUNNING fails the test here)."""
    try:
        h.result(timeout=WAIT)
    except BaseException as exc:
        state = h.status()
        if not state.terminal:
            pytest.fail(f"task still {state.value} after {WAIT} s ({exc!r})")
        return exc
    pytest.fail("result() returned instead of raising")


def cut_of(text: str) -> tuple[int, int]:
    """(characters cut, characters kept) of a text the actor cut once."""
    marks = MARK.findall(text)
    assert len(marks) == 1, f"expected one cut mark in {text[:80]!r}…"
    mark = MARK.search(text)
    assert mark is not None
    return int(marks[0].replace(",", "")), len(text) - len(mark.group(0))


def events_of(h: cpsl.TaskHandle) -> list[cpsl.TaskEvent]:
    """The task's events until it ended, read in a thread so a hang fails instead of blocking."""
    got: list[cpsl.TaskEvent] = []
    reader = threading.Thread(target=lambda: got.extend(h.events()), daemon=True)
    reader.start()
    reader.join(WAIT)
    assert not reader.is_alive(), "h.events() did not end"
    return got


# ---- a long exception message -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["async", "plain", "process"])
def test_a_huge_exception_message_fails_the_task_promptly_with_a_cut_error_text(start, variant):
    start(app, workers=1, process_workers=1)
    began = time.monotonic()
    h = RAISERS[variant].submit(HUGE)
    exc = failure(h)
    assert time.monotonic() - began < WAIT
    assert type(exc) is ValueError and str(exc) == "x" * HUGE  # whole, from the pickled exception
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED and info.attempts == 1
    assert info.error is not None and info.error[0] == "ValueError"
    text = info.error[1]
    assert len(text) <= ERROR_BOUND
    cut, kept = cut_of(text)
    assert cut + kept == HUGE and text.startswith("xxx") and text.endswith("xxx")
    tb = getattr(exc, "remote_traceback", "")
    assert len(tb) <= TRACEBACK_BOUND and MARK.search(tb)
    assert tb.startswith("Traceback (most recent call last):") and "ValueError: xxx" in tb
    assert f"in {RAISERS[variant].name}" in tb  # the head keeps the frames
    assert add.submit(2, 3).result(timeout=WAIT) == 5  # the actor and the supervisor go on


def test_the_card_of_a_task_with_a_cut_error_says_so(start):
    start(app, workers=1, process_workers=1)
    h = raise_async.submit(HUGE)
    assert isinstance(failure(h), ValueError)
    card = TaskCard(h)
    assert card.state is cpsl.TaskState.FAILED
    cut, _ = cut_of(card.error or "")
    assert card.error_cut == cut
    note = f"error text truncated: {cut:,} characters cut"
    assert card.text().splitlines()[-1] == note
    html = card.html()
    assert f'<div class="cpsl-meta cpsl-truncated">{note}</div>' in html
    assert len(html) < 2 * ERROR_BOUND  # the card shows a summary, not the whole text
    whole = TaskCard({"task_id": "t1", "name": "n", "state": "FAILED", "error": "ValueError: short"})
    assert whole.error_cut == 0 and whole.truncation_note() is None
    assert "truncated" not in whole.text() and "cpsl-truncated" not in whole.html()


def test_a_done_that_cannot_fit_even_cut_fails_the_attempt_naming_the_size(start):
    start(app, workers=1, process_workers=1)
    n = HEADER_LIMIT + 1000  # an exception type name longer than any header
    h = raise_long_type_name.submit(n)
    exc = failure(h)
    assert type(exc).__name__ == "E" * n and str(exc) == "a short message"  # the pickled exception
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED and info.error is not None
    assert info.error[0] == "TaskFailed"
    size = re.search(r"take ([0-9,]+) bytes of the 1,048,576-byte limit of a message header", info.error[1])
    assert size is not None and int(size.group(1).replace(",", "")) > n, info.error[1]
    assert len(info.error[1]) < 1000
    assert add.submit(1, 1).result(timeout=WAIT) == 2


def test_an_error_text_msgpack_cannot_encode_still_ends_the_attempt(start):
    start(app, workers=1, process_workers=1)
    h = raise_undecodable_name.submit()
    exc = failure(h)
    assert type(exc) is ValueError and str(exc) == "cannot read /data/caf\udce9.csv"  # pickle keeps it
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED and info.error is not None
    assert info.error == ("ValueError", "cannot read /data/caf\\udce9.csv")  # escaped in the text


def test_a_small_max_payload_bytes_cuts_the_error_text_to_what_the_socket_passes(start):
    start(small_app, workers=1, process_workers=1)
    h = raise_small.submit(200_000)
    exc = failure(h)  # the pickled exception is over max_payload_bytes: the text is all there is
    assert isinstance(exc, TaskFailed) and exc.error_type == "ValueError"
    info = h.info()
    assert info.state is cpsl.TaskState.FAILED and info.error is not None
    cut, kept = cut_of(info.error[1])
    assert cut + kept == 200_000
    assert len(info.error[1]) + len(exc.remote_traceback) < small_app.max_payload_bytes + (1 << 16)


# ---- oversized session events -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["async", "plain", "process"])
def test_a_huge_session_event_raises_in_the_task_and_sends_nothing(start, variant):
    rt = start(app, workers=1, process_workers=1)
    sid = f"huge-{variant}"
    h = OVERSENDERS[variant].submit(2_000_000, session=cpsl.Session(sid))
    caught = h.result(timeout=WAIT)
    assert len(caught) == 2, caught
    for text in caught:
        assert "over the 1,048,576-byte limit" in text and "bytes as a message header" in text
    assert caught[0].startswith("session reply would be 2,000,") and caught[1].startswith("session progress")
    events = events_of(h)
    talk = [e.data for e in events if e.kind in ("reply", "progress")]
    assert talk == [{"text": "still talking"}]
    assert [e.data["state"] for e in events if e.kind == "state"][-1] == "SUCCEEDED"
    assert add.submit(4, 5).result(timeout=WAIT) == 9
    assert rt.status()["tasks"].get("RUNNING", 0) == 0


# ---- restarts -----------------------------------------------------------------------------


def test_nothing_is_stuck_after_a_graceful_stop_and_a_restart(start):
    rt = start(app, workers=1, process_workers=1)
    handles = [task.submit(HUGE) for task in RAISERS.values()]
    deadline = time.monotonic() + WAIT
    for h in handles:  # bounded, and not an assertion: the restart below is what is tested
        try:
            h.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            pass
    rt.stop()
    rt = start(app, workers=1, process_workers=1)
    wait_until(lambda: all(h.status() is cpsl.TaskState.FAILED for h in handles), timeout=WAIT)
    assert [h.info().attempts for h in handles] == [1, 1, 1]  # none ran again
    counts = rt.status()["tasks"]
    assert counts.get("QUEUED", 0) == counts.get("RUNNING", 0) == 0, counts


# ---- the bounds themselves ----------------------------------------------------------------


def test_the_actors_header_limit_is_the_decoders():
    from capsule_actors.actors import worker

    assert worker.HEADER_LIMIT == HEADER_LIMIT
    assert (worker.MAX_ERROR_CHARS, worker.MAX_TRACEBACK_CHARS) == (ERROR_BOUND, TRACEBACK_BOUND)

    def emit(size: int) -> bytes:
        """An Emit header of exactly ``size`` bytes (past 64 Ki characters msgpack's str header is fixed)."""
        overhead = len(messages.Emit("t", 1, "reply", {"text": "a" * 70_000}).encode()) - 70_000
        return messages.Emit("t", 1, "reply", {"text": "a" * (size - overhead)}).encode()

    fits = emit(HEADER_LIMIT)
    assert len(fits) == HEADER_LIMIT and isinstance(messages.decode(fits), messages.Emit)
    over = emit(HEADER_LIMIT + 1)
    assert len(over) == HEADER_LIMIT + 1
    with pytest.raises(ProtocolError, match="exceeds"):
        messages.decode(over)
    assert worker.header_limit(16 << 20) == HEADER_LIMIT and worker.header_limit(1000) == 1000 + (1 << 16)


@pytest.mark.parametrize("size", [0, 10, 16_384, 16_385, 100_000, 10**7])
def test_clip_keeps_head_and_tail_within_the_bound_and_the_card_reads_its_mark(size):
    from capsule_actors.actors.worker import MAX_ERROR_CHARS, clip

    text = "".join(chr(48 + i % 40) for i in range(size))
    cut = clip(text, MAX_ERROR_CHARS)
    assert len(cut) <= MAX_ERROR_CHARS
    card = TaskCard({"task_id": "t", "state": "FAILED", "error": f"E: {cut}"})
    if size <= MAX_ERROR_CHARS:
        assert cut == text and card.error_cut == 0
        return
    n, kept = cut_of(cut)
    assert n + kept == size and card.error_cut == n
    head, tail = MARK.split(cut)[0], MARK.split(cut)[2]
    assert text.startswith(head) and text.endswith(tail) and abs(len(head) - len(tail)) <= 1


def test_a_done_is_fitted_to_any_limit():
    from capsule_actors.actors.worker import MAX_TRACEBACK_CHARS, fitted

    def done(etype: str, text: str) -> messages.Done:
        return messages.Done("t" * 64, 1, "error", etype, text, text, False, "n" * 64)

    for limit in (HEADER_LIMIT, 1001 + (1 << 16)):
        for etype, text in (("ValueError", "\U0001f600" * MAX_TRACEBACK_CHARS), ("E" * (limit + 1), "x")):
            header = fitted(done(etype, text), limit)
            assert len(header) <= limit
            got: Any = messages.decode(header)
            assert (got.task_id, got.outcome, got.began_next) == ("t" * 64, "error", "n" * 64)
