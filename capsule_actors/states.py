"""The one list of task states, shared by the supervisor, the store, the CLI, the board and handles."""

from __future__ import annotations

import enum


class TaskState(str, enum.Enum):
    """Where a task is in its life; the last three are terminal."""

    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def __str__(self) -> str:
        return self.value


# Module-level names: a global lookup, cheaper than an enum attribute on the supervisor's hot path.
QUEUED = TaskState.QUEUED
SCHEDULED = TaskState.SCHEDULED
RUNNING = TaskState.RUNNING
SUCCEEDED = TaskState.SUCCEEDED
FAILED = TaskState.FAILED
CANCELLED = TaskState.CANCELLED

ALL = tuple(TaskState)
LIVE = (QUEUED, SCHEDULED, RUNNING)  # held by the supervisor until they end
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def parse(value: str) -> TaskState:
    """A state from user input (any case); ConfigError naming the valid ones otherwise."""
    from .errors import ConfigError

    try:
        return TaskState(value.upper())
    except (ValueError, AttributeError):
        raise ConfigError(f"unknown task state {value!r}; expected one of {', '.join(ALL)}") from None
