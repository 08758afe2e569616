"""Observability (SPEC section 9): /metrics scraped over HTTP after known work, checked to the
exact count and by promtool; ``--metrics`` refusals; JSON log lines; traces from the submitter's
span into each attempt (async, sync, process=True, a retry); nothing of OpenTelemetry without it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli, skip_or_fail, spawn_cli, wait_running, wait_until

# the [test] extra installs both extras' packages (and .ci/run the [test] extra): missing, the module fails
from prometheus_client.parser import text_string_to_metric_families

import capsule_actors as cpsl
from capsule_actors import testing

STORES = ("sqlite", "postgresql")  # the tests that start a runtime (through `start`) run on both stores

NOW = cpsl.Backoff(initial=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = free_port()
app = cpsl.App("observability-tests", metrics=f"127.0.0.1:{PORT}")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task(retries=2, backoff=NOW)
async def always_fails() -> None:
    raise ValueError("no")


@app.task(process=True, timeout=0.3)
def too_slow() -> None:
    import time

    for _ in range(300):  # 30 s, far past its 0.3 s timeout
        time.sleep(0.1)


@app.task(retries=1, backoff=NOW)
def crashes_once() -> str:
    return "survived"


@app.task
async def later() -> None:
    pass


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def metrics_runtime(start: Any) -> Iterator[cpsl.Runtime]:
    yield start(app, workers=1, process_workers=1)


def test_metrics_count_known_work_exactly(metrics_runtime: cpsl.Runtime) -> None:
    # Given known work: 5 successes, a task failing 3 times (2 retries), a timeout, a crash then
    # a successful retry, and a delayed task cancelled before it ran
    # (the crash first and alone: it kills whatever else its actor runs)
    testing.crash_on_attempt(crashes_once, attempt=1)
    crashing = crashes_once.submit()
    assert crashing.result(timeout=30) == "survived"
    handles = [add.submit(i, i) for i in range(5)]
    failing, slow = always_fails.submit(), too_slow.submit()
    delayed = later.schedule(delay=3600)
    assert delayed.cancel()
    assert testing.join(handles, timeout=30) == [0, 2, 4, 6, 8]
    for h in (failing, slow):
        with contextlib.suppress(Exception):
            h.result(timeout=30)
    assert failing.status() is cpsl.TaskState.FAILED and slow.status() is cpsl.TaskState.FAILED

    # When /metrics is scraped (the view is published once a second: poll until it has caught up)
    def caught_up() -> dict[Any, float] | None:
        found = samples(scrape(PORT))
        return found if value(found, "capsule_tasks_failed_total", task="too_slow") == 1 else None

    found = wait_until(caught_up, timeout=10)

    # Then every counter is exact, by task name
    expected = {
        "add": {"submitted": 5, "started": 5, "succeeded": 5},
        "always_fails": {"submitted": 1, "started": 3, "retried": 2, "failed": 1},
        "too_slow": {"submitted": 1, "started": 1, "timed_out": 1, "failed": 1},
        "crashes_once": {"submitted": 1, "started": 2, "crashed": 1, "retried": 1, "succeeded": 1},
        "later": {"submitted": 1, "cancelled": 1},
    }
    events = ("submitted", "started", "succeeded", "failed", "retried", "cancelled", "timed_out", "crashed")
    for task, counts in expected.items():
        for event in events:
            got = value(found, f"capsule_tasks_{event}_total", task=task)
            assert (got or 0) == counts.get(event, 0), (task, event, got)
    # the histograms saw each started attempt once (queue wait) and each ended one (run time)
    assert value(found, "capsule_task_queue_wait_seconds_count", task="add") == 5
    assert value(found, "capsule_task_run_seconds_count", task="add") == 5
    assert value(found, "capsule_task_run_seconds_count", task="always_fails") == 3
    assert value(found, "capsule_task_run_seconds_bucket", task="add", le="+Inf") == 5
    assert (value(found, "capsule_store_commit_seconds_count") or 0) > 0
    # the gauges: nothing live, one actor slot of each role ready, the crash counted as a restart
    assert value(found, "capsule_tasks_queued") == 0 and value(found, "capsule_tasks_running") == 0
    assert value(found, "capsule_tasks_scheduled") == 0 and value(found, "capsule_backlog_tasks") == 0
    for role in ("worker", "process", "clock"):
        assert value(found, "capsule_actors", role=role, state="ready") == 1, role
    assert value(found, "capsule_actor_restarts", role="worker") == 1
    assert (value(found, "capsule_actor_rss_bytes", slot="w0", role="worker", node="") or 0) > 10 * 2**20
    assert value(found, "capsule_worker_nodes") == 0
    # and no label carries an id or a key
    ids = {h.id for h in (*handles, failing, slow, crashing, delayed)}
    assert not any(v in ids for _, labels in found for _, v in labels)


def test_metrics_show_live_tasks_while_they_wait(metrics_runtime: cpsl.Runtime) -> None:
    # Given a delayed task, then a queue-ing one
    h = later.schedule(delay=3600)
    # Then the scheduled gauge counts it, and goes back to 0 once it is cancelled
    wait_until(lambda: value(samples(scrape(PORT)), "capsule_tasks_scheduled") == 1, timeout=10)
    assert h.cancel()
    wait_until(lambda: value(samples(scrape(PORT)), "capsule_tasks_scheduled") == 0, timeout=10)


def test_promtool_accepts_the_output(metrics_runtime: cpsl.Runtime) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (`apt-get install prometheus`, as .ci/run does)")
    assert add.submit(1, 2).result(timeout=30) == 3

    def with_a_success() -> str | None:
        text = scrape(PORT)
        return text if 'capsule_tasks_succeeded_total{task="add"}' in text else None

    text = wait_until(with_a_success, timeout=10)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["localhost:http", "1.2.3.4:99999", "nope!:9464", "a-!b:1", "-x:9464", ""])
def test_a_bad_metrics_address_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(cpsl.ConfigError, match="expected PORT or HOST:PORT"):
        cpsl.App("bad-metrics", metrics=bad)


def test_metrics_listen_on_loopback_unless_an_address_is_given() -> None:
    assert cpsl.App("m", metrics=9464).metrics == "127.0.0.1:9464"
    assert cpsl.App("m", metrics=":9464").metrics == "127.0.0.1:9464"
    assert cpsl.App("m", metrics="0.0.0.0:9464").metrics == "0.0.0.0:9464"
    assert cpsl.App("m", metrics="[::1]:9464").metrics == "[::1]:9464"


def test_a_metrics_port_in_use_fails_the_start_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cpsl.App("busy-metrics", metrics=port, workers=1, process_workers=1)
        with (
            pytest.raises(cpsl.ConfigError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another port"),
            testing.start_runtime(busy, tmp_path / "s", timeout=60),
        ):
            pass


def test_run_refuses_a_bad_metrics_flag(tmp_path: Path) -> None:
    (tmp_path / "obs_app.py").write_text("import capsule_actors as cpsl\napp = cpsl.App('obs')\n")
    done = cli("run", "obs_app:app", "--metrics", "127.0.0.1:port", state_dir=tmp_path / "s", cwd=tmp_path)
    assert done.returncode == 1
    assert "metrics='127.0.0.1:port': expected PORT or HOST:PORT" in done.stderr


def test_run_names_the_extra_when_prometheus_client_is_missing(tmp_path: Path) -> None:
    # Given prometheus_client made unimportable in the run process
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked="prometheus_client"))
    (tmp_path / "obs_app.py").write_text("import capsule_actors as cpsl\napp = cpsl.App('obs')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    cmd = [sys.executable, "-m", "capsule_actors", "run", "obs_app:app", "--metrics", "0"]
    done = subprocess.run(
        [*cmd, "--state-dir", str(tmp_path / "s")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'capsule_actors[metrics]'" in done.stderr


# A sitecustomize that makes a package unimportable (as if it were not installed).
BLOCKER = """
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "{blocked}" or name.startswith("{blocked}."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
"""


# ---- JSON logs -----------------------------------------------------------------------------

LOGGING_APP = """
import logging
import capsule_actors as cpsl

app = cpsl.App("obs-logs")

@app.task
async def shout(word):
    logging.getLogger("obs.app").warning("async says %s", word)
    return word

@app.task(process=True)
def shout_sync(word):
    logging.getLogger("obs.app").warning("process says %s", word)
    return word
"""


def test_run_log_format_json_writes_one_object_per_line_with_the_task(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], state_dir: Path
) -> None:
    # Given a supervisor run with --log-format json
    (tmp_path / "obs_logs.py").write_text(LOGGING_APP)
    args = ["run", "obs_logs:app", "--workers", "1", "--process-workers", "1", "--log-format", "json"]
    run = spawn_cli(procs, *args, state_dir=state_dir, cwd=tmp_path)
    wait_running(state_dir)
    # When two tasks log a line each
    for task in ("shout", "shout_sync"):
        done = cli("submit", "obs_logs:app", task, '["hi"]', "--wait", state_dir=state_dir, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    task_ids = {
        t["name"]: t["id"] for t in json.loads(cli("tasks", "--json", state_dir=state_dir, cwd=tmp_path).stdout)
    }
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0

    # Then every stderr line is a JSON object with the base fields
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "capsule_actors.supervisor" and line["level"] == "INFO" for line in lines)
    # and the lines logged inside an attempt carry its task id, name and attempt
    said = {line["message"]: line for line in lines if line["logger"] == "obs.app"}
    for message, task in (("async says hi", "shout"), ("process says hi", "shout_sync")):
        line = said[message]
        assert (line["task_id"], line["task_name"], line["attempt"]) == (task_ids[task], task, 1)
        assert line["level"] == "WARNING"
    # while the supervisor's own lines carry none
    assert not any("task_id" in line for line in lines if line["logger"] == "capsule_actors.supervisor")


def test_text_logs_stay_the_default(tmp_path: Path, procs: list[subprocess.Popen[bytes]], state_dir: Path) -> None:
    (tmp_path / "obs_logs.py").write_text(LOGGING_APP)
    run = spawn_cli(procs, "run", "obs_logs:app", "--workers", "1", state_dir=state_dir, cwd=tmp_path)
    wait_running(state_dir)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    lines = err.decode().splitlines()
    assert any("INFO supervisor pid" in line for line in lines), lines
    assert not any(line.startswith("{") for line in lines)


# ---- traces --------------------------------------------------------------------------------

TRACED_APP = '''
import json, os, time
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import capsule_actors as cpsl


def record(span):
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "links": [format(link.context.span_id, "016x") for link in span.links],
        "attributes": dict(span.attributes),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


class FileExporter(SpanExporter):
    """The actors' spans, one JSON line each, for the test to read (they end in other processes)."""

    def export(self, spans):
        with open(os.environ["SPANS_FILE"], "a") as f:
            for span in spans:
                f.write(json.dumps(record(span)) + "\\n")
        return SpanExportResult.SUCCESS


memory = InMemorySpanExporter()  # the submitter's spans


def configure_tracing():
    """The app's SDK set-up: called by the submitter, and by every actor as it starts."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


app = cpsl.App("traced", workers=1, process_workers=1, on_actor_start=configure_tracing)


@app.task
async def async_task(x):
    return x


@app.task
def sync_task(x):
    with trace.get_tracer("user").start_as_current_span("inside sync"):
        return x


@app.task(process=True)
def process_task(x):
    return x


@app.task(retries=1, backoff=cpsl.Backoff(initial=0.0))
async def retried_task(flag):
    if not Path(flag).exists():
        Path(flag).touch()
        raise ValueError("first attempt fails")
    return "second"
'''

TRACED_DRIVER = '''
import json, os, sys
from opentelemetry import trace
from traced_app import app, async_task, sync_task, process_task, retried_task, memory, record, configure_tracing

configure_tracing()
tracer = trace.get_tracer("driver")
out = {}
with app.start(state_dir=sys.argv[1], grace=5.0):
    for task, arg in ((async_task, 1), (sync_task, 2), (process_task, 3), (retried_task, sys.argv[2])):
        with tracer.start_as_current_span(f"submit {task.name}"):
            h = task.submit(arg)
        out[task.name] = {"id": h.id, "result": h.result(timeout=60)}
    with tracer.start_as_current_span("submit delayed"):
        delayed = async_task.schedule(4, delay=0.3)  # held in the store until due: the context waits too
    out["delayed"] = {"id": delayed.id, "result": delayed.result(timeout=60)}
    with_no_span = async_task.submit(5)
    out["no_span"] = {"id": with_no_span.id, "result": with_no_span.result(timeout=60)}
out["client_spans"] = [record(s) for s in memory.get_finished_spans()]
print(json.dumps(out))
'''


def test_traces_follow_a_submit_into_each_attempt(tmp_path: Path) -> None:
    # Given an app with an OpenTelemetry SDK, submitting each kind of task inside a span of its own
    (tmp_path / "traced_app.py").write_text(TRACED_APP)
    (tmp_path / "drive.py").write_text(TRACED_DRIVER)
    spans_file = tmp_path / "spans.jsonl"
    env = dict(os.environ, SPANS_FILE=str(spans_file), PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    args = [sys.executable, "drive.py", str(tmp_path / "s"), str(tmp_path / "flag")]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [out[n]["result"] for n in ("async_task", "sync_task", "process_task", "retried_task")] == [
        1, 2, 3, "second"
    ]
    submitters = {s["name"]: s for s in out["client_spans"] if s["name"].startswith("submit ")}
    driver_pid = out["client_spans"][0]["pid"]
    attempts = [s for s in map(json.loads, spans_file.read_text().splitlines()) if s["name"].startswith("run ")]

    def attempts_of(name: str) -> list[dict[str, Any]]:
        found = [s for s in attempts if s["attributes"]["capsule.task.id"] == out[name]["id"]]
        return sorted(found, key=lambda s: s["attributes"]["capsule.attempt"])

    # Then each attempt's span is a child of its submitter's span, in the same trace, in an actor
    for name, actor in (("async_task", "w0"), ("sync_task", "w0"), ("process_task", "p0")):
        (span,) = attempts_of(name)
        parent = submitters[f"submit {name}"]
        assert (span["trace_id"], span["parent_id"]) == (parent["trace_id"], parent["span_id"]), name
        assert span["pid"] != driver_pid
        assert span["attributes"] == {
            "capsule.task.name": name,
            "capsule.task.id": out[name]["id"],
            "capsule.attempt": 1,
            "capsule.actor": actor,
            "capsule.outcome": "ok",
        }
        assert span["status"] == "UNSET" and not span["links"]
    # a span the sync task opens nests under its attempt's (the context reaches the thread)
    (inner,) = [s for s in map(json.loads, spans_file.read_text().splitlines()) if s["name"] == "inside sync"]
    assert inner["parent_id"] == attempts_of("sync_task")[0]["span_id"]
    # a retried task: both attempts children of the submitter, the second linked to the first
    first, second = attempts_of("retried_task")
    parent = submitters["submit retried_task"]
    for span in (first, second):
        assert (span["trace_id"], span["parent_id"]) == (parent["trace_id"], parent["span_id"])
    assert first["attributes"]["capsule.outcome"] == "error" and first["status"] == "ERROR"
    assert first["events"] == ["exception"]
    assert second["links"] == [first["span_id"]] and second["attributes"]["capsule.outcome"] == "ok"
    # a delayed task (held in the store until due) too
    (span,) = [s for s in attempts if s["attributes"]["capsule.task.id"] == out["delayed"]["id"]]
    parent = submitters["submit delayed"]
    assert (span["trace_id"], span["parent_id"]) == (parent["trace_id"], parent["span_id"])
    # a submit outside any span: its attempt is a root span of a trace of its own
    (lone,) = [s for s in attempts if s["attributes"]["capsule.task.id"] == out["no_span"]["id"]]
    assert lone["parent_id"] is None
    assert lone["trace_id"] not in {s["trace_id"] for s in submitters.values()}


NO_OTEL = '''
import sys
import capsule_actors as cpsl
from capsule_actors import tracing, logs, metrics


def loaded():
    return sorted(m for m in sys.modules if m.startswith(("opentelemetry", "capsule_actors._otel")))


app = cpsl.App("no-otel", workers=1, process_workers=1)

@app.task
async def in_worker():
    return loaded()

@app.task(process=True)
def in_process():
    return loaded()

with app.start(state_dir=sys.argv[1], grace=5.0):
    print("worker:", in_worker.submit().result(timeout=60))
    print("process:", in_process.submit().result(timeout=60))
print("app:", loaded())
'''


def test_nothing_of_opentelemetry_is_imported_without_it(tmp_path: Path) -> None:
    # Given opentelemetry made unimportable in every process (a sitecustomize on the path)
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked="opentelemetry"))
    (tmp_path / "no_otel.py").write_text(NO_OTEL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    # When tasks of both kinds run
    args = [sys.executable, "no_otel.py", str(tmp_path / "s")]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # Then they work, and no process tried to import it
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["worker: []", "process: []", "app: []"]
