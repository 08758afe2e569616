"""Where one ``submit().result()`` round trip spends its time, step by step, across processes.

    /work/venv/bin/python benchmarks/steps.py [CHECKOUT] [--n 3000]

Copies ``CHECKOUT/capsule_actors`` (default: this checkout's) to a scratch directory and adds
timestamp probes there (never to the checkout): in the client (the ``Submit`` sent, the caller's
wake-up, each reply received), the supervisor (each poll's return, each SQL statement through
SQLite's trace callback, each send) and the worker actor (its drain, the attempt's start, the
``Done``'s send). ``time.perf_counter()`` is one clock for every process of the machine, so the
probes of one round trip line up. Then N sequential round trips of an async no-op on a fresh
runtime (SQLite), and per step the median over the round trips in which every probe was seen.

The probes add ~10 % to every step (a list append each); the table is for seeing where time
goes and comparing two checkouts, not for the absolute figure (``latency.py`` and
``ab_latency.py`` measure that). A probe that no longer fits the code it patches stops the run
with the file and the text it looked for: update ``PROBES`` with the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import print_machine, temp_dir  # noqa: E402

ENV = "CAPSULE_STEP_PROBES"  # the probes' file prefix; unset, a probed copy records nothing

# (file, text in it, text put in its place): each probe appends (perf_counter(), label) to a list
# that its process writes to ``$CAPSULE_STEP_PROBES.<role><pid>``.
PROBES: list[tuple[str, str, str]] = [
    (
        "store/sqlite.py",
        """        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:""",
        """        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._probes = None
        if os.environ.get("CAPSULE_STEP_PROBES"):
            import atexit
            self._probes = probes = []
            def write(path=os.environ["CAPSULE_STEP_PROBES"] + f".sup{os.getpid()}"):
                with open(path, "w") as f:
                    f.writelines(f"{t:.7f} {label}\\n" for t, label in probes)
            atexit.register(write)
            self.db.set_trace_callback(lambda sql, add=probes.append, now=time.perf_counter: add((now(), sql[:40])))
        for pragma in _PRAGMAS:""",
    ),
    (
        "supervisor/core.py",
        """        ready = dict(self.poller.poll(timeout))
""",
        """        ready = dict(self.poller.poll(timeout))
        if getattr(self.store, "_probes", None) is not None:
            self.store._probes.append((time.perf_counter(), "POLL " + ("A" if self.actor_sock in ready else "")
                                       + ("C" if self.client_sock in ready else "")))
""",
    ),
    (
        "supervisor/core.py",
        """        self.outbox = outbox = Outbox(self.client_sock, self.actor_sock, self.remote_sock)
""",
        """        self.outbox = outbox = Outbox(self.client_sock, self.actor_sock, self.remote_sock)
        outbox.probes = getattr(db, "_probes", None)
""",
    ),
    (
        "supervisor/outbox.py",
        """    def flush(self) -> None:
        for sock, frames in self.pending:""",
        """    probes = None

    def flush(self) -> None:
        import time
        for sock, frames in self.pending:
            if self.probes is not None:
                self.probes.append((time.perf_counter(), "SEND " + ("A" if sock is self.actor_sock else "C")))""",
    ),
    (
        "actors/worker.py",
        """    def _drain(self) -> None:""",
        """    _probes: list = []

    def _drain(self) -> None:
        if os.environ.get("CAPSULE_STEP_PROBES"):
            self._probes.append((time.perf_counter(), "A-DRAIN"))
            if len(self._probes) > 3000:  # actors end with os._exit: no atexit
                with open(os.environ["CAPSULE_STEP_PROBES"] + f".actor{os.getpid()}", "a") as f:
                    f.writelines(f"{t:.7f} {label}\\n" for t, label in self._probes)
                self._probes.clear()""",
    ),
    (
        "actors/worker.py",
        """    async def _perform(self, run: messages.Run, payload: bytes) -> None:""",
        """    async def _perform(self, run: messages.Run, payload: bytes) -> None:
        if self._probes:
            self._probes.append((time.perf_counter(), "A-PERFORM"))""",
    ),
    (
        "actors/worker.py",
        """        check_header(frames[0], self.header_limit, "a message")
        self.sock.send_multipart(frames)""",
        """        check_header(frames[0], self.header_limit, "a message")
        if self._probes:
            self._probes.append((time.perf_counter(), "A-SEND"))
        self.sock.send_multipart(frames)
        if self._probes:
            self._probes.append((time.perf_counter(), "A-SENT"))""",
    ),
    (
        "connection.py",
        """            for i in range(1, len(frames)):  # the first part went: the rest cannot block
                sock.send(frames[i], _NOBLOCK_MORE if i < len(frames) - 1 else _NOBLOCK, copy=False)""",
        """            for i in range(1, len(frames)):  # the first part went: the rest cannot block
                sock.send(frames[i], _NOBLOCK_MORE if i < len(frames) - 1 else _NOBLOCK, copy=False)
            if PROBES is not None:
                PROBES.append((time.perf_counter(), "C-SENT"))""",
    ),
    (
        "connection.py",
        """                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return""",
        """                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            if PROBES is not None:
                PROBES.append((time.perf_counter(), "C-RECV"))""",
    ),
    (
        "connection.py",
        """                ready = [fd for fd, _ in self._lead_poll.poll(left * 1000)]""",
        """                ready = [fd for fd, _ in self._lead_poll.poll(left * 1000)]
                if PROBES is not None:
                    PROBES.append((time.perf_counter(), "C-WOKE"))""",
    ),
    (
        "connection.py",
        """class Connection""",
        """PROBES = [] if os.environ.get("CAPSULE_STEP_PROBES") else None


class Connection""",
    ),
]

# The steps of a round trip: each one ends at the first probe with this label (a prefix) after
# the previous one.
STEPS: list[tuple[str, str]] = [
    ("C-SENT", "client: submit() until the Submit is sent (prepare, journal, send)"),
    ("POLL C", "hop client -> supervisor"),
    ("INSERT OR IGNORE INTO tasks", "supervisor Submit turn: poll -> the INSERT (recv, decode, Intake)"),
    ("SEND A", "supervisor: INSERT + its event -> the Run is sent"),
    ("A-DRAIN", "the Run's send + hop supervisor -> actor"),
    ("A-PERFORM", "actor: drain -> the attempt begins (a loop turn)"),
    ("A-SEND", "actor: the attempt (unpickle, body, pickle, Done)"),
    ("A-SENT", "actor: the Done's send"),
    ("POLL A", "hop actor -> supervisor"),
    ("UPDATE tasks SET state='SUCCEEDED'", "supervisor Done turn: poll -> UPDATE ... SUCCEEDED"),
    ("COMMIT", "supervisor: the UPDATE + its event -> COMMIT"),
    ("SEND C", "supervisor: COMMIT -> the outcome is sent"),
    ("C-WOKE", "the outcome's send + hop supervisor -> client"),
    ("C-RECV", "client: wake-up -> first recv"),
    ("C-END", "client: the replies (outcome, journaled ack), result()"),
]

DRIVER = """
import os, sys, time
import capsule_actors as cpsl
from capsule_actors import connection
app = cpsl.App("steps", grace=2.0)

@app.task
async def noop(x):
    return x

n = int(sys.argv[2])
with app.start(state_dir=sys.argv[1], workers=2, process_workers=1):
    for i in range(300):
        noop.submit(i).result(timeout=10)
    probes = connection.PROBES
    probes.clear()
    for i in range(n):
        probes.append((time.perf_counter(), "C-START"))
        noop.submit(i).result(timeout=10)
        probes.append((time.perf_counter(), "C-END"))
with open(os.environ["CAPSULE_STEP_PROBES"] + f".client{os.getpid()}", "w") as f:
    f.writelines(f"{t:.7f} {label}\\n" for t, label in probes)
"""


def probed_copy(checkout: Path, into: Path) -> Path:
    """``checkout``'s package with the probes, in ``into``; SystemExit if one does not fit."""
    package = into / "capsule_actors"
    shutil.copytree(checkout / "capsule_actors", package, ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in PROBES:
        path = package / name
        text = path.read_text()
        if old not in text:
            raise SystemExit(f"steps.py: a probe no longer fits {path.relative_to(into)}: it looks for\n{old}")
        path.write_text(text.replace(old, new, 1))
    return into


def read_probes(prefix: Path) -> list[tuple[float, str]]:
    found: list[tuple[float, str]] = []
    for path in prefix.parent.glob(prefix.name + ".*"):
        for line in path.read_text().splitlines():
            stamp, _, label = line.partition(" ")
            if stamp[:1].isdigit():
                found.append((float(stamp), label))
    return sorted(found)


def steps(probes: list[tuple[float, str]]) -> tuple[int, list[float], float]:
    """(round trips with every step seen, median µs per step, median total µs)."""
    starts = [i for i, (_, label) in enumerate(probes) if label == "C-START"]
    per_step: list[list[float]] = [[] for _ in STEPS]
    totals = []
    for start in starts:
        t0, at, times = probes[start][0], start + 1, []
        for label, _ in STEPS:
            while at < len(probes) and not probes[at][1].startswith(label) and probes[at][1] != "C-START":
                at += 1
            if at >= len(probes) or probes[at][1] == "C-START":
                break
            times.append(probes[at][0])
            at += 1
        if len(times) != len(STEPS):
            continue
        totals.append(times[-1] - t0)
        for k, (a, b) in enumerate(zip([t0, *times], times)):
            per_step[k].append(b - a)
    if not totals:
        return 0, [0.0] * len(STEPS), 0.0
    return len(totals), [statistics.median(v) * 1e6 for v in per_step], statistics.median(totals) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", default=str(HERE.parent), help="a directory holding capsule_actors/")
    parser.add_argument("--n", type=int, default=3000, help="measured round trips (default 3000)")
    args = parser.parse_args(argv)
    print_machine()
    with temp_dir("cpsl-steps-") as tmp:
        copy = probed_copy(Path(args.checkout).resolve(), tmp / "src")
        prefix = tmp / "probes"
        env = dict(os.environ, PYTHONPATH=str(copy), **{ENV: str(prefix)})
        subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp / "state"), str(args.n)],
            env=env,
            cwd=tmp,
            check=True,
            timeout=60 + 0.02 * args.n,  # cwd: not this checkout's package
        )
        seen, medians, total = steps(read_probes(prefix))
    print(f"{args.checkout}: {seen} of {args.n} round trips with every probe seen; medians, probes on (µs)")
    for (_, what), value in zip(STEPS, medians):
        print(f"  {what:<70} {value:7.1f}")
    print(f"  {'total (the median of the totals)':<70} {total:7.1f}")
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
