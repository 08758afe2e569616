"""Task ids: how they are made, the short form people read and type, and how a short form is
found again.

An id is 32 hex characters: 12 of the creation time in milliseconds (so ids sort by time), 12
drawn at random once per process, 8 of a counter that starts at a random value in each process.
Tasks created in the same second share their first characters, so the short form is the *end*
of the id: its last 8 characters (the counter), which differ between any two tasks of one
process and, with odds of 2**-32, between tasks of two processes. Where two tasks shown
together share their last 8 characters, both are shown with more (``short_ids``), as git does.
Everything that takes an id takes its full 32 characters or any ending of 8 or more
(``resolve``); an ending that more than one task has is refused, naming them. Finding an ending
is a scan of the store's ids, which only a short id typed by a person costs.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator

from .errors import ConfigError, UnknownTask
from .lifecycle import current_pid

ID_LENGTH = 32
SHORT = 8  # characters of the short form: the id's last ones
_HEX = frozenset("0123456789abcdef")

_ID_SOURCE: tuple[int, str, Iterator[int]] = (-1, "", iter(()))


def new_task_id() -> str:
    """32 hex characters, time-ordered: ms timestamp, then 48 random bits drawn once per process
    (again after a fork), then a counter; unique without a syscall per id."""
    global _ID_SOURCE
    pid, prefix, counter = _ID_SOURCE
    if pid != current_pid():
        pid, prefix, counter = (current_pid(), os.urandom(6).hex(), itertools.count(random.getrandbits(32)))
        _ID_SOURCE = (pid, prefix, counter)
    return f"{time.time_ns() // 1_000_000:012x}{prefix}{next(counter) & 0xFFFFFFFF:08x}"


def short_id(task_id: str) -> str:
    """The short form of one id: its last ``SHORT`` characters."""
    return task_id[-SHORT:]


def short_ids(task_ids: Iterable[str]) -> dict[str, str]:
    """The short form of each id among these: its last ``SHORT`` characters, or as many more as
    it takes to tell it from every other id here."""
    unique = list(dict.fromkeys(task_ids))
    out: dict[str, str] = {}
    width = SHORT
    pending = unique
    while pending:
        ends: dict[str, list[str]] = {}
        for task_id in pending:
            ends.setdefault(task_id[-width:], []).append(task_id)
        pending = []
        for same in ends.values():
            if len(same) == 1 or width >= ID_LENGTH:
                out.update((task_id, task_id[-width:]) for task_id in same)
            else:
                pending += same
        width += 4
    return out


def resolve(given: str, find: Callable[[str, int], list[str]]) -> str:
    """The full id that ``given`` names: the one id that ends with it when it is a short id (8 to
    31 hex characters; ``find(ending, limit)`` asks the store), else ``given`` itself.
    UnknownTask: no id ends with it; ConfigError: several do."""
    text = given.strip().lower()
    if not (SHORT <= len(text) < ID_LENGTH and set(text) <= _HEX):
        return given  # a full id, or nothing a short id could be: looked up as it is
    found = find(text, 6)
    if not found:
        raise UnknownTask(f"no task whose id ends with {text!r}")
    if len(found) > 1:
        more = ", …" if len(found) > 5 else ""
        raise ConfigError(f"task id {text!r} is the end of several ids ({', '.join(found[:5])}{more}): give more of it")
    return found[0]


__all__ = ["ID_LENGTH", "SHORT", "new_task_id", "resolve", "short_id", "short_ids"]
