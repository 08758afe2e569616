"""Process life-cycle helpers shared by the supervisor, the actor template and the actors."""

from __future__ import annotations

import ctypes
import os
import signal

# Exit codes an actor uses on purpose; anything else is a crash.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARENT_GONE = 3
EXIT_LEASE_LOST = 4  # a node's actor whose node lost its lease from the supervisor (fenced)
EXIT_INJECTED_CRASH = 70

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG), and
    handle the race where the parent died before the request took effect."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
