"""The ``capsule-actors`` command. The environment (CAPSULE_STATE_DIR) is read here and in
transport.resolve_state_dir only."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle

from . import messages
from .app import App
from .client import Connection
from .errors import CapsuleError, ConfigError
from .transport import resolve_state_dir

STATES = ("QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


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
        return resolve_state_dir(args.state_dir)
    return resolve_state_dir(app.state_dir if app is not None else None)


def cmd_run(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor

    app = load_app(args.app)
    state_dir = _state_dir(args, app)
    registry = cloudpickle.dumps(app, protocol=5)
    return Supervisor(app, registry, state_dir, workers=args.workers,
                      process_workers=args.process_workers, grace=args.grace).run()


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
    app = load_app(args.app)
    if args.state_dir is not None:
        app._state_dir_override = resolve_state_dir(args.state_dir)
    task = app.get_task(args.task)
    pos, kw = _parse_args_json(args.args_json)
    handle = task.submit(*pos, **kw)
    if not args.wait:
        print(handle.id)
        return 0
    print(json.dumps(handle.result(timeout=args.timeout), default=repr))
    return 0


def _ask(args: argparse.Namespace, make: Any) -> Any:
    """One request to the running supervisor, bounded by --timeout (a hung one is an error)."""
    try:
        body, _ = Connection.for_state_dir(_state_dir(args)).call(make, timeout=args.timeout)
    except TimeoutError:
        raise CapsuleError(f"the supervisor did not answer within {args.timeout} s") from None
    return body


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def cmd_tasks(args: argparse.Namespace) -> int:
    state = args.status.upper() if args.status else None
    body = _ask(args, lambda req: messages.ListTasks(req, state, args.limit))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [[t["id"], t["name"], t["state"], str(t["attempts"]), _when(t["created_at"]), t["lock_key"] or "-",
             f"{t['error_type']}: {t['error_message']}" if t["error_type"] else ""] for t in body]
    print(_table(rows, ["ID", "NAME", "STATE", "ATTEMPTS", "CREATED", "LOCK", "ERROR"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    body = _ask(args, lambda req: messages.Status(req))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    sup = body["supervisor"]
    print(f"supervisor pid {sup['pid']} {sup['state']} since {_when(sup['started_at'])}  "
          f"rss {sup['rss'] // 2**20} MiB  state dir {sup['state_dir']}")
    print("tasks: " + (", ".join(f"{k.lower()} {v}" for k, v in sorted(body["tasks"].items())) or "none"))
    rows = [[a["slot"], a["role"], str(a["pid"] or "-"), a["state"], str(a["restarts"]),
             f"{a['rss'] // 2**20} MiB" if a["rss"] else "-", str(a["running"]), a["last_exit"] or "-"]
            for a in body["actors"]]
    print(_table(rows, ["SLOT", "ROLE", "PID", "STATE", "RESTARTS", "RSS", "RUNNING", "LAST EXIT"]))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    body = _ask(args, lambda req: messages.Cancel(req, args.id))
    print("cancelled" if body else "already finished")
    return 0 if body else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule-actors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state-dir", help="state directory (default: $CAPSULE_STATE_DIR or ./.capsule)")
        if name in ("tasks", "status", "cancel"):
            p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the supervisor")
        return p

    p = add("run", "run the supervisor in the foreground (SIGINT/SIGTERM: graceful stop)")
    p.add_argument("app", metavar="MODULE:APP")
    p.add_argument("--workers", type=int, help="worker actors (default: the App's, else CPU count)")
    p.add_argument("--process-workers", type=int, help="process-isolated actors (default: CPU count)")
    p.add_argument("--grace", type=float, help="seconds running tasks get at a graceful stop (default: the App's)")
    p.set_defaults(func=cmd_run)
    p = add("submit", "submit a task; prints its id, or with --wait its result as JSON")
    p.add_argument("app", metavar="MODULE:APP")
    p.add_argument("task", metavar="TASK")
    p.add_argument("args_json", metavar="ARGS_JSON", nargs="?", help="JSON array (positional) or object")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it as JSON")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(func=cmd_submit)
    p = add("tasks", "list tasks, newest first")
    p.add_argument("--status", choices=[s.lower() for s in STATES] + list(STATES), help="only tasks in this state")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)
    p = add("status", "the supervisor and every actor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = add("cancel", "cancel one task")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CAPSULE_LOG_LEVEL", "INFO" if args.command == "run" else "WARNING"),
                        format="%(asctime)s capsule-actors[%(process)d] %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except CapsuleError as exc:
        print(f"capsule-actors: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the task's own exception from submit --wait
        if args.command == "submit":
            print(f"capsule-actors: the task raised {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        Connection.close_all()


