"""The ``capsule-actors`` command: where a CLI process starts, so where its configuration is
resolved (``bootstrap.py`` reads the environment; the commands pass what they resolve down)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import bootstrap, ids, logs, messages, states
from .app import App
from .client import Client
from .errors import CapsuleError, ConfigError, Fenced, NotRunning, StateDirError, StoreUnavailable, UnknownTask
from .flows import FLOW_TASK
from .lifecycle import profiled
from .session import Session

if TYPE_CHECKING:
    from .store import StoreReader

STATES = tuple(s.value for s in states.ALL)


def load_app(target: str) -> App:
    """Import ``module:attr`` (the current directory is importable, as with uvicorn)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{target!r}: expected MODULE:APP, e.g. myproject.tasks:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise ConfigError(f"{target!r} is a {type(obj).__name__}, not a capsule_actors.App")
    return obj


def _state_dir(args: argparse.Namespace, app: App | None = None) -> Path:
    if args.state_dir is not None:
        return bootstrap.resolve_state_dir(args.state_dir)
    return bootstrap.resolve_state_dir(app.state_dir if app is not None else None)


def cmd_run(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor

    store_option = _store_option(args)  # before the app's code is imported: bad input fails first
    app = load_app(args.app)
    state_dir = _state_dir(args, app)
    registry = cloudpickle.dumps(app, protocol=5)
    keys = Path(args.keys).absolute() if args.keys else None
    store_url = bootstrap.store_url(store_option, app.store)
    metrics = _metrics_option(args)
    if args.lease is not None and args.name is None:
        raise ConfigError("--lease is a cluster member's: it goes with --name")
    lease = {} if args.lease is None else {"lease": args.lease}

    def supervisor() -> Supervisor:
        return Supervisor(
            app,
            registry,
            state_dir,
            workers=args.workers,
            process_workers=args.process_workers,
            grace=args.grace,
            bind_tcp=args.bind,
            keys_dir=keys,
            store_url=store_url,
            metrics=metrics,
            cluster_name=args.name,
            **lease,
        )

    sup = supervisor()  # bad options fail here, before anything starts
    if args.name is None:
        return profiled("supervisor", sup.run)
    return _member(supervisor, sup)


def _member(make: Callable[[], Any], sup: Any) -> int:
    """A cluster member: fenced (its lease ran out) or cut off from the store for longer than its
    lease, it rejoins as a new incarnation, trying again while the store cannot be reached."""
    log = logging.getLogger("capsule_actors.supervisor")
    delay = 0.5
    while True:
        try:
            return int(sup.run())
        except (Fenced, StoreUnavailable) as exc:
            log.warning("cluster member rejoining as a new incarnation after: %s", exc)
            delay = 0.5
        except StateDirError as exc:
            if "cannot reach the PostgreSQL store" not in str(exc):
                raise
            log.warning("%s; trying again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)
        sup = make()


def _metrics_option(args: argparse.Namespace) -> str | None:
    """``--metrics [HOST:]PORT``, checked before anything starts (and the extra it needs)."""
    if not args.metrics:
        return None
    from .metrics import normalize_address, require_client

    address = normalize_address(args.metrics)
    require_client()
    return address


def _store_option(args: argparse.Namespace) -> str | None:
    """``--store URL``, refused when it holds a password (``ps`` would show it to everyone)."""
    from urllib.parse import urlsplit

    if args.store and urlsplit(args.store).password:
        raise ConfigError(
            "--store: a password on the command line shows in `ps`; put the URL in CAPSULE_STORE, or the "
            "password in PGPASSFILE or PGPASSWORD"
        )
    return str(args.store) if args.store else None


def _check_store(args: argparse.Namespace, state_dir: Path) -> None:
    """``--store`` on a command that talks to the running supervisor: it must name the store that
    supervisor uses (``store.json``), so a command never reads one store while the user means another."""
    from . import store

    given = bootstrap.check_store(_store_option(args))
    if given is None or not (state_dir / store.STORE_FILE).is_file():
        return  # nothing said, or no supervisor ever ran here (the request says NotRunning)
    used, _ = store.remembered(state_dir)

    def key(url: str | None) -> str:
        return str(store.without_password(url)) if store.is_postgres(url) else str(store.sqlite_path(state_dir, url))

    if key(given) != key(used):
        raise ConfigError(
            f"--store {store.without_password(given)!r}: the supervisor of {state_dir} uses "
            f"{store.without_password(used) or 'SQLite in the state directory'!r}; this command talks to that "
            "supervisor, so give its state directory (--state-dir) or leave --store out"
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from .node import WorkerNode
    from .transport import RemoteEndpoint

    app = load_app(args.app)
    key = Path(args.key).absolute()
    endpoint = RemoteEndpoint.with_keys(args.connect, key)
    return WorkerNode(
        app, endpoint, key, name=args.name, workers=args.workers, process_workers=args.process_workers, grace=args.grace
    ).run()


def cmd_keys(args: argparse.Namespace) -> int:
    from .transport import add_client_key, key_fingerprint, load_keys, make_keys

    if args.add:
        secret = add_client_key(Path(args.dir).absolute(), args.add)
        public, _ = load_keys(secret.parent, args.add)
        print(
            f"client key {args.add!r} ({key_fingerprint(public)}) written and authorized: copy {secret} and "
            f"{secret.parent / 'server.key'} to the client, then for a worker node (named {args.add}, like its key):"
        )
        print(f"  capsule-actors worker MODULE:APP --connect tcp://HOST:PORT --key {secret.name}")
        print("  a running supervisor lets it in once it reloads its keys: kill -HUP <its pid>")
        return 0
    directory = make_keys(Path(args.dir).absolute())
    print(f"CURVE keys written to {directory} (mode 0700):")
    print(f"  supervisor:  capsule-actors run MODULE:APP --bind tcp://HOST:PORT --keys {directory}")
    print(f"  clients:     CAPSULE_CONNECT=tcp://HOST:PORT CAPSULE_KEYS={directory} python app.py")
    print("  a client needs server.key, client.key and client.key_secret; add more clients' public")
    print(f"  keys to {directory / 'authorized'}/ to let them in.")
    return 0


def _parse_args_json(text: str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if text is None:
        return (), {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ARGS_JSON {text!r} is not JSON ({exc}); e.g. '[1, 2]' or '{{\"x\": 1}}'") from None
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    return (value,), {}


def cmd_submit(args: argparse.Namespace) -> int:
    _store_option(args)  # before the app's code is imported: bad input fails first
    app = load_app(args.app)
    if args.state_dir is not None:
        app.bind(bootstrap.from_environment(args.state_dir))
    _check_store(args, app.resolved_state_dir())
    task = app.get_task(args.task)
    pos, kw = _parse_args_json(args.args_json)
    session = Session(args.session) if args.session else None
    with _time_limit(args.timeout):  # the whole command: the submit's ack too, not only the wait
        handle = task.submit(*pos, session=session, **kw)
        if not args.wait:
            print(handle.id)
            return 0
        bar = _ProgressBar(handle, sys.stderr) if sys.stderr.isatty() else None
        try:
            value = handle.result(timeout=args.timeout)
        finally:
            if bar is not None:
                bar.close()
    print(json.dumps(value, default=repr))
    return 0


class CommandTimeout(CapsuleError):
    """``--timeout`` passed (not a TimeoutError: the waits inside retry those)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CommandTimeout in the main thread once ``seconds`` have passed (SIGALRM)."""
    if seconds is None:
        yield
        return
    if seconds <= 0:
        raise ConfigError(f"--timeout {seconds:g}: expected seconds above 0")

    def expire(signum: int, frame: Any) -> None:
        raise CommandTimeout(f"--timeout {seconds:g} s passed before the supervisor answered")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds + 0.5)  # the result wait's own timeout speaks first
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _ProgressBar:
    """``submit --wait`` on a terminal: one line on stderr, fed by the task's events
    (``session.report_progress`` needs a session: ``--session ID``), redrawn 5 times a second."""

    def __init__(self, handle: Any, stream: Any) -> None:
        from .ui.card import format_duration, progress_bar

        self._bar, self._duration = progress_bar, format_duration
        self.handle, self.stream = handle, stream
        self.state, self.fraction, self.message = states.QUEUED.value, None, ""
        self.started: float | None = None
        self._t0 = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._follower = threading.Thread(target=self._follow, name="capsule-progress-events", daemon=True)
        self._follower.start()
        self._ticker = threading.Thread(target=self._tick, name="capsule-progress", daemon=True)
        self._ticker.start()

    def _follow(self) -> None:
        try:
            for event in self.handle.events():
                with self._lock:
                    if event.kind == "state":
                        self.state = event.data.get("state", self.state)
                        if self.state == states.RUNNING and self.started is None:
                            self.started = time.monotonic()
                    elif event.kind == "progress":
                        self.fraction = event.data.get("fraction")
                        self.message = event.data.get("message") or ""
        except Exception:  # the connection closes when the command exits
            return

    def _line(self) -> str:
        with self._lock:
            fraction = 1.0 if self.state == states.SUCCEEDED and self.fraction is None else self.fraction
            pct = "  ?%" if fraction is None else f"{round(fraction * 100):3d}%"
            since = self.started if self.started is not None else self._t0
            line = (
                f"{self._bar(fraction, 30, unicode=True)} {pct}  {self.state.lower()}  "
                f"{self._duration(time.monotonic() - since)}"
            )
            if self.message:
                line += f"  {self.message}"
        return line[: max(20, _terminal_width(self.stream) - 1)]

    def _draw(self, end: str = "") -> None:
        self.stream.write("\r\x1b[2K" + self._line() + end)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._done.wait(0.2):
            self._draw()

    def close(self) -> None:
        self._follower.join(1.0)  # it ends by itself after the terminal event
        self._done.set()
        self._ticker.join(1.0)
        with contextlib.suppress(Exception):
            final = self.handle.info()
            with self._lock:
                self.state = final.state.value
                if final.progress is not None:
                    self.fraction = final.progress
        self._draw("\n")


def _terminal_width(stream: Any) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns > 0 else 100


def _ask(args: argparse.Namespace, make: Any) -> Any:
    """One request to the running supervisor, bounded by --timeout (a hung one is an error)."""
    config = bootstrap.from_environment(args.state_dir)
    _check_store(args, config.state_dir)
    try:
        body, _ = Client.shared(config).call(make, timeout=args.timeout)
    except TimeoutError:
        raise CapsuleError(f"the supervisor did not answer within {args.timeout} s") from None
    return body


def _read(args: argparse.Namespace, make: Any, offline: Any) -> tuple[Any, NotRunning | None]:
    """A reading command's answer: from the running supervisor (``make`` its request), else
    straight from the store it used (``offline(reader)``), saying so on stderr, with the reason
    none answered. No store either (no runtime ever ran here): NotRunning, saying how to start one."""
    try:
        return _ask(args, make), None
    except NotRunning as exc:
        reader = _offline_reader(args, exc)
        try:
            return offline(reader), exc
        finally:
            reader.close()


def _offline_reader(args: argparse.Namespace, not_running: NotRunning) -> StoreReader:
    """The store of the state directory's last supervisor, opened read-only (nothing created,
    migrated or locked): ``--store``, else what ``store.json`` names, else SQLite in the state dir."""
    from . import store

    config = bootstrap.from_environment(args.state_dir)
    reader = None
    if config.remote is None:
        reader = store.open_reader(config.state_dir, bootstrap.check_store(_store_option(args)), still=True)
    if reader is None:
        raise not_running
    print(
        f"capsule-actors: no supervisor is running for {config.state_dir}; reading its task store directly",
        file=sys.stderr,
    )
    return reader


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


_ANSI = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}
STATE_COLORS: dict[str, str] = {
    states.QUEUED: "dim",
    states.SCHEDULED: "magenta",
    states.RUNNING: "blue",
    states.SUCCEEDED: "green",
    states.FAILED: "red",
    states.CANCELLED: "yellow",
}
ACTOR_COLORS = {"ready": "green", "starting": "yellow", "stopping": "yellow", "restarting": "red", "down": "red"}


def use_color(stream: Any) -> bool:
    """Colors on a terminal only; NO_COLOR turns them off, FORCE_COLOR on (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def _paint(text: str, color: str | None, on: bool) -> str:
    return f"\x1b[{_ANSI[color]}m{text}\x1b[0m" if on and color and text else text


def _table(
    rows: list[list[str]],
    header: list[str],
    *,
    colors: list[dict[str, str] | None] | None = None,
    right: tuple[int, ...] = (),
    color: bool = False,
    max_width: int | None = None,
) -> str:
    """Aligned columns (two spaces apart). Widths are computed on the plain text, then cells are
    colored (``colors[i]`` maps a cell's value to a color); numbers in ``right`` align right.
    With ``max_width`` the last column is cut to fit."""
    rows = [[str(c) for c in row] for row in rows]
    if max_width is not None and rows:
        fixed = sum(max(len(c) for c in col) + 2 for col in list(zip(header, *rows))[:-1])
        room = max(12, max_width - fixed)
        rows = [[*row[:-1], row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"] for row in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths)):
            pad = " " * (width - len(cell))
            table_colors = colors[i] if colors and n else None
            painted = _paint(cell, "bold" if n == 0 else (table_colors or {}).get(cell), color)
            cells.append(pad + painted if i in right and n else painted + pad)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{round(value * 100)}%"


def _elapsed(t: dict[str, Any]) -> str:
    from .ui.card import format_duration

    if not t.get("started_at"):
        return "-"
    return format_duration((t.get("finished_at") or time.time()) - t["started_at"])


def cmd_tasks(args: argparse.Namespace) -> int:
    if args.dead and args.status and args.status.upper() != "FAILED":
        raise ConfigError(f"--dead lists FAILED tasks: it does not go with --status {args.status}")
    state = "FAILED" if args.dead else (args.status.upper() if args.status else None)
    if not 1 <= args.limit <= 100_000:
        raise ConfigError(f"--limit {args.limit}: expected 1..100000")
    body, offline = _read(
        args,
        lambda req: messages.ListTasks(req, state, args.limit),
        lambda reader: [  # as the supervisor lists them; no key has an owner while none runs
            {**row, "owner": None} for row in reader.list_tasks(states.parse(state) if state else None, args.limit)
        ],
    )
    if args.name:
        body = [t for t in body if t["name"] == args.name]
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if offline is None:  # a workflow's steps are named by its supervisor (read from the store: ungrouped)
        body = _grouped(args, body)
    color = use_color(sys.stdout)
    short = ids.short_ids(t["id"] for t in body)
    rows = [
        [
            ("  └ " if t.get("in_flow") else "") + short[t["id"]],
            _flow_name(t),
            t["state"],
            str(t["attempts"]),
            _pct(t.get("progress")),
            _when(t["created_at"]),
            _elapsed(t),
            t["lock_key"] or "-",
            f"{t['error_type']}: {t['error_message']}" if t["error_type"] else "",
        ]
        for t in body
    ]
    header = ["ID", "NAME", "STATE", "ATTEMPTS", "PROGRESS", "CREATED", "ELAPSED", "LOCK", "ERROR"]
    colors: list[dict[str, str] | None] = [None] * len(header)
    colors[2] = STATE_COLORS
    width = _terminal_width(sys.stdout) if sys.stdout.isatty() else None
    print(_table(rows, header, colors=colors, right=(3, 4, 6), color=color, max_width=width))
    return 0


def _flow_record(args: argparse.Namespace, flow_id: str) -> dict[str, Any]:
    """A workflow's first ``flow`` event: its steps, their inputs, its on_error step."""
    page = _ask(args, lambda req: messages.Events(req, flow_id, 0))
    for event in page["events"]:
        if event["kind"] == "flow":
            return dict(event["data"])
    raise UnknownTask(f"{flow_id!r} is not a workflow")


def _grouped(args: argparse.Namespace, body: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each workflow as one line (its state, how many steps, which run) with its steps below."""
    flows = [t for t in body if t["name"] == FLOW_TASK]
    if not flows:
        return body
    by_id = {t["id"]: t for t in body}
    members: dict[str, list[dict[str, Any]]] = {}
    for flow in flows:
        record = _flow_record(args, flow["id"])
        steps = [*record["steps"], *([record["on_error"]] if record.get("on_error") else [])]
        members[flow["id"]] = [{**by_id[s], "in_flow": True} for s in steps if s in by_id]
        running = sum(1 for s in steps if s in by_id and by_id[s]["state"] == "RUNNING")
        flow["flow_steps"] = f"flow: {len(steps)} steps, {running} running"
        flow["state"] = _flow_state(flow["state"])
    inside = {t["id"] for rows in members.values() for t in rows}
    grouped = []
    for t in body:
        if t["id"] not in inside:
            grouped += [t, *members.get(t["id"], [])]
    return grouped


def _flow_state(state: str) -> str:
    """A workflow's state as FlowHandle.status() and the board say it: RUNNING while a step is
    left (its record waits, SCHEDULED, for every step), then how it ended."""
    return "RUNNING" if state in ("QUEUED", "SCHEDULED") else state


def _flow_name(t: dict[str, Any]) -> str:
    return str(t.get("flow_steps") or t["name"])


def cmd_flow(args: argparse.Namespace) -> int:
    """A workflow's tree: each step with its state, where its input comes from, its error."""
    info = _ask(args, lambda req: messages.Info(req, [args.id]))[0]
    if info is None:
        raise UnknownTask(f"no workflow with id {args.id!r}")
    record = _flow_record(args, info["id"])
    handler = record.get("on_error")
    steps = [*record["steps"], *([handler] if handler else [])]
    infos = {}
    for i in range(0, len(steps), 1000):
        for step in _ask(args, lambda req, part=steps[i : i + 1000]: messages.Info(req, part)):
            if step is not None:
                infos[step["id"]] = step
    if args.json:
        print(json.dumps({"flow": info, **record, "step_info": infos}, indent=2))
        return 0
    color = use_color(sys.stdout)
    short = ids.short_ids([info["id"], *steps])
    state = _flow_state(info["state"])
    print(f"workflow {short[info['id']]}  {_paint(state, STATE_COLORS.get(state), color)}")
    rows = []
    for step in steps:
        t = infos.get(step, {"name": "?", "state": "?", "attempts": 0, "error_type": None})
        came = _spec_text(record["inputs"].get(step), short) if step != handler else "on_error"
        err = f"{t['error_type']}: {t['error_message']}" if t.get("error_type") else ""
        rows.append([short[step], t["name"], t["state"], str(t["attempts"]), came or "-", err])
    header = ["STEP", "NAME", "STATE", "ATTEMPTS", "INPUT", "ERROR"]
    colors: list[dict[str, str] | None] = [None] * len(header)
    colors[2] = STATE_COLORS
    print(_table(rows, header, colors=colors, right=(3,), color=color))
    return 0


def _spec_text(spec: Any, short: dict[str, str]) -> str:
    if spec is None:
        return ""
    if isinstance(spec, str):
        return short.get(spec, spec)
    return "[" + ", ".join(_spec_text(s, short) for s in spec) + "]"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        body, not_running = _read(args, lambda req: messages.Status(req), _stopped_status)
    except NotRunning as exc:  # an answer to "status", not a failure to report: on stdout, exit 1
        if args.json:
            raise
        print(f"supervisor {_paint('not running', 'red', use_color(sys.stdout))}: {exc}")
        return 1
    if not_running is not None:  # the last known state, from the store: exit 1, as for "not running"
        _print_stopped({**body, "message": str(not_running)}, args.json)
        return 1
    status = messages.StatusSnapshot.from_wire(body)
    if args.json:
        print(json.dumps(status.to_wire(), indent=2))
        return 0
    color = use_color(sys.stdout)
    sup = status.supervisor
    state = _paint(sup.state, "green" if sup.state == "running" else "yellow", color)
    print(
        f"supervisor pid {sup.pid} {state} since {_when(sup.started_at)}  "
        f"rss {sup.rss // 2**20} MiB  state dir {sup.state_dir}"
    )
    print(_store_line(sup, color))
    counts = sorted(status.tasks.items(), key=lambda kv: STATES.index(kv[0]) if kv[0] in STATES else 99)
    print("tasks: " + (", ".join(f"{_paint(k.lower(), STATE_COLORS.get(k), color)} {v}" for k, v in counts) or "none"))
    print(_actors_table(status.actors, color))
    if status.nodes:
        print()
        print(_nodes_table(status.nodes, color))
    if status.members:
        print()
        print(_members_table(status.members, status.member, color))
    return 0


def _stopped_status(reader: StoreReader) -> dict[str, Any]:
    """``status`` while no supervisor runs: stopped, and the tasks its store holds."""
    return {"supervisor": {"state": "stopped"}, "actors": [], "nodes": [], "tasks": reader.counts()}


def _print_stopped(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(body, indent=2))
        return
    color = use_color(sys.stdout)
    print(f"supervisor {_paint('stopped', 'red', color)}: {body['message']}")
    counts = sorted(body["tasks"].items(), key=lambda kv: STATES.index(kv[0]) if kv[0] in STATES else 99)
    print("tasks: " + (", ".join(f"{_paint(k.lower(), STATE_COLORS.get(k), color)} {v}" for k, v in counts) or "none"))


def cmd_info(args: argparse.Namespace) -> int:
    body, _ = _read(
        args,
        lambda req: messages.Info(req, [args.id]),
        lambda reader: [reader.info(ids.resolve(args.id, reader.find_ids))],
    )
    record = body[0] if body else None
    if record is None:
        raise UnknownTask(f"no task with id {args.id!r}")
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    fields = {**record, "created_at": _when(record["created_at"]), "started_at": _when(record["started_at"])}
    fields["finished_at"] = _when(record["finished_at"])
    fields["progress"] = _pct(record["progress"])
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0


def _store_line(sup: messages.SupervisorStatus, color: bool) -> str:
    """The store's size (and its WAL's, and the free space, where the store knows them)."""
    line = f"store {sup.store_bytes / 2**20:.1f} MiB"
    if sup.wal_bytes:
        line += f"  wal {sup.wal_bytes / 2**20:.1f} MiB"
    if sup.free_bytes >= 0:
        line += f"  free {sup.free_bytes / 2**20:.1f} MiB"
    if sup.store_full:
        line += _paint("  FULL: new tasks are refused until space is freed", "red", color)
    return line


def _actors_table(actors: list[messages.ActorStatus], color: bool) -> str:
    rows = [
        [
            a.slot,
            a.role,
            str(a.pid or "-"),
            a.state,
            str(a.restarts),
            f"{a.rss // 2**20} MiB" if a.rss else "-",
            str(a.running),
            a.last_exit or "-",
        ]
        for a in actors
    ]
    colors: list[dict[str, str] | None] = [None] * 8
    colors[3] = ACTOR_COLORS
    header = ["SLOT", "ROLE", "PID", "STATE", "RESTARTS", "RSS", "RUNNING", "LAST EXIT"]
    return _table(rows, header, colors=colors, right=(2, 4, 5, 6), color=color)


def _nodes_table(nodes: list[messages.NodeStatus], color: bool) -> str:
    rows = [
        [n.name, n.host, str(n.pid), n.state, _when(n.joined_at), f"{n.last_seen_ago:.1f} s ago", " ".join(n.slots)]
        for n in nodes
    ]
    header = ["NODE", "HOST", "PID", "STATE", "JOINED", "LAST SEEN", "ACTORS"]
    return _table(rows, header, right=(2,), color=color)


def _members_table(members: list[dict[str, Any]], me: dict[str, Any] | None, color: bool) -> str:
    """The cluster's members (live ones first): this one marked with *."""
    live = [m for m in members if m.get("state") == "live"] + [m for m in members if m.get("state") != "live"]
    rows = [
        [
            ("*" if me and m.get("id") == me.get("id") else "") + str(m.get("name")),
            str(m.get("id")),
            str(m.get("host")),
            str(m.get("pid")),
            _paint(str(m.get("state")), {"live": "green", "lost": "red"}.get(str(m.get("state"))), color),
            _when(m.get("joined")),
            _when(m.get("renewed")),
            str(m.get("shards")),
            "yes" if m.get("clock") else "",
            str(m.get("live_tasks")),
        ]
        for m in live[:20]
    ]
    header = ["MEMBER", "ID", "HOST", "PID", "STATE", "JOINED", "RENEWED", "SHARDS", "CLOCK", "LIVE TASKS"]
    return "cluster members:\n" + _table(rows, header, right=(1, 3, 7, 9), color=color)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        body = _ask(args, lambda req: messages.Cancel(req, args.id))
    except NotRunning as exc:
        raise NotRunning(f"cancel changes a task, so it needs a running supervisor: {exc}") from None
    print("cancelled" if body else "already finished")
    return 0 if body else 1


def cmd_retry(args: argparse.Namespace) -> int:
    """Submit FAILED tasks again: each as a new task (a new id, its own attempts) whose origin
    names it (the old record's ``retried as``); a task retried once is not retried again."""
    if (args.id is None) == (not args.all_dead) or (args.all_dead and not args.name):
        raise ConfigError("retry takes a task ID, or --all-dead --name TASK (every dead task of that name)")
    try:
        if args.id is not None:
            targets = [args.id]
        else:
            rows = _ask(args, lambda req: messages.ListTasks(req, "FAILED", 100_000))
            targets = [t["id"] for t in reversed(rows) if t["name"] == args.name]  # oldest first
        failed = 0
        for task_id in targets:
            try:
                body = _ask(args, lambda req, task_id=task_id: messages.Retry(req, task_id))
            except ConfigError as exc:  # retried already (or not finished): said, and skipped
                print(f"{task_id}: not retried: {exc}", file=sys.stderr)
                failed += 1
                continue
            item = messages.SubmitAck.from_wire(body).items[0]
            verb = "joined live task" if item.deduplicated else "retried as"
            print(f"{task_id} {verb} {item.task_id}")
    except NotRunning as exc:
        raise NotRunning(f"retry submits tasks, so it needs a running supervisor: {exc}") from None
    if args.all_dead:
        print(f"{len(targets) - failed} of {len(targets)} dead {args.name!r} tasks retried", file=sys.stderr)
    return 1 if failed and args.id is not None else 0


def cmd_board(args: argparse.Namespace) -> int:
    from .ui.board import TaskBoard

    board = TaskBoard(_state_dir(args), port=args.port, store=bootstrap.store_url(_store_option(args), None))

    def ready(url: str) -> None:
        print(
            f"capsule-actors board for {board.state_dir}\n"
            f"    {url}\n"
            "(the token in this URL is the board's password; Ctrl-C stops the board)",
            flush=True,
        )

    board.run(on_ready=ready)
    return 0


_STORE_HELP = (
    "postgresql://USER@HOST:PORT/DB[?schema=NAME] (default: the App's, else $CAPSULE_STORE, else SQLite in "
    "the state directory); no password here: CAPSULE_STORE, PGPASSFILE or PGPASSWORD"
)

_STORE_CHECK_HELP = (
    "the store the supervisor of --state-dir uses (checked: a different one is an error); no password here"
)


_EPILOG = """\
All commands but `keys` and `worker` work on a state directory: --state-dir DIR, else
$CAPSULE_STATE_DIR, else ./.capsule. `tasks`, `info` and `status` read its task store directly
when no supervisor is running there; `submit`, `cancel` and `retry` need a running one
(`capsule-actors run MODULE:APP`). A task id can be given in full or by its last 8 or more
characters, as `tasks` shows it. `capsule-actors COMMAND --help` describes each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsule-actors",
        description="Run and inspect a capsule_actors runtime: its supervisor, tasks and board.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `tasks --state queued` must not mean --state-dir
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, allow_abbrev=False)
        p.add_argument("--state-dir", help="state directory (default: $CAPSULE_STATE_DIR or ./.capsule)")
        if name in ("tasks", "status", "info", "flow", "cancel", "retry"):
            p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the supervisor")
        p.add_argument("--store", metavar="URL", help=_STORE_HELP if name in ("run", "board") else _STORE_CHECK_HELP)
        return p

    p = add("run", "run the supervisor in the foreground (SIGINT/SIGTERM: graceful stop)")
    p.add_argument("app", metavar="MODULE:APP")
    p.add_argument("--workers", type=int, help="worker actors (default: the App's, else CPU count)")
    p.add_argument("--process-workers", type=int, help="process-isolated actors (default: CPU count)")
    p.add_argument("--grace", type=float, help="seconds running tasks get at a graceful stop (default: the App's)")
    p.add_argument("--bind", metavar="tcp://HOST:PORT", help="also serve clients over TCP (CURVE keys required)")
    p.add_argument("--keys", metavar="DIR", help="CURVE keys for --bind (default: STATE_DIR/keys)")
    p.add_argument(
        "--name",
        help="join a cluster as this member: supervisors sharing one PostgreSQL --store share its work and take over "
        "from a lost member",
    )
    p.add_argument(
        "--lease",
        type=float,
        help="a cluster member's lease in seconds: a member silent that long is taken over (default 6)",
    )
    p.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus /metrics there (127.0.0.1 unless HOST is given; needs capsule_actors[metrics])",
    )
    _log_format_option(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "worker", allow_abbrev=False, help="run a worker node: actors on this host that join a supervisor over TCP"
    )
    p.add_argument("app", metavar="MODULE:APP")
    p.add_argument("--connect", required=True, metavar="tcp://HOST:PORT", help="the supervisor's --bind address")
    p.add_argument(
        "--key",
        required=True,
        metavar="FILE",
        help="this node's NAME.key_secret from `capsule-actors keys DIR --add NAME` (server.key "
        "beside it), or a keys directory",
    )
    p.add_argument("--name", help="node name: the NAME its key was made for (the default; a key is bound to its name)")
    p.add_argument("--workers", type=int, help="worker actors on this node (default: CPU count)")
    p.add_argument("--process-workers", type=int, help="process-isolated actors on this node (default: CPU count)")
    p.add_argument("--grace", type=float, help="seconds running tasks get when the node stops (default: the App's)")
    _log_format_option(p)
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser(
        "keys", allow_abbrev=False, help="generate the CURVE key pairs that --bind tcp://... and remote clients need"
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--add", metavar="NAME", help="add one more authorized client key pair (e.g. for a worker node)")
    p.set_defaults(func=cmd_keys)
    p = add("submit", "submit a task; prints its id, or with --wait its result as JSON")
    p.add_argument("app", metavar="MODULE:APP")
    p.add_argument("task", metavar="TASK")
    p.add_argument("args_json", metavar="ARGS_JSON", nargs="?", help="JSON array (positional) or object")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (the submit, and with --wait the result)",
    )
    p.add_argument(
        "--session",
        metavar="ID",
        help="bind the task to this session (its report_progress feeds the --wait progress bar)",
    )
    p.set_defaults(func=cmd_submit)
    p = add("tasks", "list tasks, newest first")
    p.add_argument("--status", choices=[s.lower() for s in STATES] + list(STATES), help="only tasks in this state")
    p.add_argument("--dead", action="store_true", help="only dead letters: tasks that failed for good (FAILED)")
    p.add_argument("--name", metavar="TASK", help="only tasks of this name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)
    p = add("info", "one task's record (ID: the full id or its last 8+ characters, as `tasks` shows)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = add("flow", "one workflow's steps: state, attempts, where each input comes from (ID: full or 8+ chars)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flow)
    p = add("status", "the supervisor and every actor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = add("cancel", "cancel one task (ID: the full id or its last 8+ characters)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_cancel)
    p = add("retry", "submit a failed task again, as a new task that names its origin")
    p.add_argument("id", metavar="ID", nargs="?", help="the task (full id or its last 8+ characters)")
    p.add_argument("--all-dead", action="store_true", help="every FAILED task of --name not retried yet")
    p.add_argument("--name", metavar="TASK", help="the task name, with --all-dead")
    p.set_defaults(func=cmd_retry)
    p = add("board", "serve the live task board on 127.0.0.1 (prints its URL with the access token)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0 = any free port)")
    p.set_defaults(func=cmd_board)
    return parser


def _log_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text (default), or json: one JSON object per line, with the task's id/name/attempt where there is one",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("INFO" if args.command in ("run", "worker") else "WARNING", getattr(args, "log_format", None))
    try:
        return int(args.func(args))
    except CapsuleError as exc:
        print(f"capsule-actors: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:  # submit --timeout
        if args.command == "submit":
            print(f"capsule-actors: {exc}", file=sys.stderr)
            return 1
        raise
    except Exception as exc:  # the task's own exception from submit --wait
        if args.command == "submit":
            print(f"capsule-actors: the task raised {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        Client.close_all()
