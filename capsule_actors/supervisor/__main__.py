"""Entry of an embedded supervisor started by ``app.start()``: on stdin, one JSON line of settings
that must not show on a command line (the store URL may hold a password), then the pickled App."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import cloudpickle

from .. import logs
from ..errors import CapsuleError
from ..lifecycle import die_with_parent, profiled
from .core import Supervisor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capsule_actors.supervisor")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--process-workers", type=int)
    parser.add_argument("--grace", type=float)
    args = parser.parse_args(argv)
    logs.configure("WARNING")
    die_with_parent(args.parent, signal.SIGTERM)  # embedded: stop gracefully with the app
    settings = json.loads(sys.stdin.buffer.readline())
    registry = sys.stdin.buffer.read()
    app = cloudpickle.loads(registry)
    sup = Supervisor(
        app,
        registry,
        Path(args.state_dir),
        workers=args.workers,
        process_workers=args.process_workers,
        grace=args.grace,
        ready_fd=args.ready_fd,
        store_url=settings.get("store"),
    )
    try:
        return profiled("supervisor", sup.run)
    except CapsuleError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
