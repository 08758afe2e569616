"""capsule_actors: background tasks, schedules and live task UI without a broker.

import capsule_actors as cpsl
app = cpsl.App("reports")

@app.task(retries=3)
async def build_report(report_id: int) -> str: ...

with app.start():
    print(build_report.submit(7).result())
"""

from . import ui
from .app import App, Backoff, Task, default_app, schedule, task
from .errors import (
    AlreadyRunning,
    Backpressure,
    CapsuleError,
    CapsuleInternalError,
    ConfigError,
    KeyRefused,
    LockConflict,
    NotRunning,
    ProtocolError,
    SerializationError,
    StateDirError,
    StoreFull,
    StoreUnavailable,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TaskTimeout,
    UnknownTask,
    WorkerCrashed,
)
from .flows import FlowHandle, Signature, chain, chord, group
from .handle import TaskEvent, TaskHandle, TaskInfo, await_all, wait_all
from .limits import RateLimit
from .runtime import Runtime
from .session import Session, current_session
from .states import TaskState

__version__ = "0.1.0"

__all__ = [
    # declaring and running
    "App",
    "Task",
    "Backoff",
    "RateLimit",
    "Runtime",
    "default_app",
    "task",
    "schedule",
    # handles and records
    "TaskHandle",
    "TaskInfo",
    "TaskState",
    "TaskEvent",
    "wait_all",
    "await_all",
    # workflows
    "Signature",
    "chain",
    "group",
    "chord",
    "FlowHandle",
    # sessions and task UI
    "Session",
    "current_session",
    "ui",
    # errors
    "CapsuleError",
    "ConfigError",
    "SerializationError",
    "NotRunning",
    "KeyRefused",
    "AlreadyRunning",
    "StateDirError",
    "StoreFull",
    "StoreUnavailable",
    "UnknownTask",
    "LockConflict",
    "Backpressure",
    "ProtocolError",
    "TaskError",
    "TaskFailed",
    "TaskCancelled",
    "WorkerCrashed",
    "TaskTimeout",
    "CapsuleInternalError",
]
