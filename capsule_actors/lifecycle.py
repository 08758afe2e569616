"""Process life-cycle helpers shared by the supervisor, the actor template and the actors."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
PROFILE_ENV = "CAPSULE_PROFILE_DIR"

# Exit codes an actor uses on purpose; anything else is a crash.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARENT_GONE = 3
EXIT_LEASE_LOST = 4  # a node's actor whose node lost its lease from the supervisor (fenced)
EXIT_INJECTED_CRASH = 70

# The one table of exit reasons: what each code means and whether it is a normal exit (OTP's
# ``normal``: a transient child is not restarted after one). Every other code, and every death
# by a signal, is abnormal.
EXIT_REASONS: dict[int, tuple[str, bool]] = {
    EXIT_OK: ("stopped", True),
    EXIT_ERROR: ("failed", False),
    EXIT_PARENT_GONE: ("its parent died", False),
    EXIT_LEASE_LOST: ("fenced: its node's lease ran out", False),
    EXIT_INJECTED_CRASH: ("crashed on purpose (testing.crash_on_attempt)", False),
}


def exit_cause(returncode: int) -> str:
    """'exit code 1' or 'signal SIGKILL' (subprocess's convention: a signal is negative), for
    logs and ``status``."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def normal_exit(returncode: int) -> bool:
    """Whether an exit is normal (an orderly stop) in the sense of OTP's restart types."""
    return EXIT_REASONS.get(returncode, ("", False))[1]


_PR_SET_PDEATHSIG = 1
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """``os.getpid()`` without a system call per use (kept right across fork): the submit path
    asks for it several times per task."""
    return _pid


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG), and
    handle the race where the parent died before the request took effect."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def profiled(name: str, run: Callable[[], T]) -> T:
    """``run()``; with $CAPSULE_PROFILE_DIR set, under cProfile, its stats written to
    ``DIR/NAME.PID.prof`` when it returns (how benchmarks/RESULTS.md's profiles are taken)."""
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        return run()
    import cProfile

    profile = cProfile.Profile()
    try:
        return profile.runcall(run)
    finally:
        profile.dump_stats(os.path.join(directory, f"{name}.{os.getpid()}.prof"))
