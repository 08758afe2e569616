"""How every process of a runtime logs: text lines (the default) or, with ``--log-format json``
on ``run`` and ``worker``, one JSON object per line for log shippers.

A JSON line holds time (ISO 8601, UTC), level, logger, message, the process id, and the task's
id, name and attempt when the line was logged inside an attempt (the actor sets
``current_attempt`` around each one) or passed them as ``extra=``. The format chosen where a
runtime starts reaches the actor processes it forks through ``CAPSULE_LOG_FORMAT`` (read here,
as ``CAPSULE_LOG_LEVEL`` is), so one runtime writes one format.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import os

from .errors import ConfigError

FORMATS = ("text", "json")
FORMAT_VARIABLE = "CAPSULE_LOG_FORMAT"
LEVEL_VARIABLE = "CAPSULE_LOG_LEVEL"

# (task id, task name, attempt) of the attempt this code runs in; None outside of one
current_attempt: contextvars.ContextVar[tuple[str, str, int] | None] = contextvars.ContextVar(
    "capsule_attempt", default=None
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, tag: str | None = None) -> None:
        super().__init__()
        self._tag = tag  # e.g. an actor's slot

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self._tag:
            line["actor"] = self._tag
        attempt = current_attempt.get()
        if attempt is not None:
            line["task_id"], line["task_name"], line["attempt"] = attempt
        for field in ("task_id", "task_name", "attempt"):
            if hasattr(record, field):
                line[field] = getattr(record, field)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise ConfigError(f"log format {value!r}: expected one of {', '.join(FORMATS)}")
    return value


def configure(default_level: str, log_format: str | None = None, tag: str | None = None, force: bool = False) -> None:
    """Set up this process's root logger (unless it has handlers already, or ``force``):
    ``log_format`` if given (and passed on to the processes it starts), else the one its parent
    chose, else text."""
    if log_format is not None:
        os.environ[FORMAT_VARIABLE] = check_format(log_format)
    chosen = os.environ.get(FORMAT_VARIABLE) or "text"
    handler = logging.StreamHandler()
    if chosen == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        where = f" {tag}" if tag else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s capsule-actors[%(process)d]{where} %(levelname)s %(message)s")
        )
    logging.basicConfig(level=os.environ.get(LEVEL_VARIABLE, default_level), handlers=[handler], force=force)
