"""The task store: the only code that holds SQL, the database file's name and the schema version.

``base.py`` says what a store must do (``TaskStore`` for the supervisor, ``StoreReader`` for the
board and the clock); ``sqlite.py`` is the embedded default, ``capsule.db`` in the state directory.
"""

from __future__ import annotations

from pathlib import Path

from .base import Error, NewTask, StoredTask, StoreReader, TaskStore
from .sqlite import DB_FILE, MAX_PAGE, SCHEMA_VERSION, SQLiteReader, SQLiteStore


def open_store(state_dir: Path) -> TaskStore:
    """The supervisor's store for ``state_dir`` (created when missing)."""
    return SQLiteStore(state_dir / DB_FILE)


def open_reader(state_dir: Path) -> StoreReader | None:
    """A read-only view of ``state_dir``'s store, or None when no runtime ever ran there."""
    path = state_dir / DB_FILE
    return SQLiteReader(path) if path.is_file() else None


__all__ = [
    "DB_FILE",
    "MAX_PAGE",
    "SCHEMA_VERSION",
    "Error",
    "NewTask",
    "SQLiteReader",
    "SQLiteStore",
    "StoreReader",
    "StoredTask",
    "TaskStore",
    "open_reader",
    "open_store",
]
