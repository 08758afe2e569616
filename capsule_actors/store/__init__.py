"""The task store: the only code that holds SQL, the database file's name and the schema version.

``base.py`` says what a store must do (``TaskStore`` for the supervisor, ``StoreReader`` for the
board and the clock); ``sqlite.py`` is the embedded default, ``capsule.db`` in the state directory;
``postgres.py`` keeps the same tables in a PostgreSQL schema (``store="postgresql://…"``; psycopg
is imported only then).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import (
    ACTOR_EVENT_PREFIX,
    ACTOR_EXIT,
    FLOW_RECORD,
    Error,
    NewTask,
    StatsRows,
    StoredTask,
    StoreReader,
    TaskStore,
    flow_kind,
)
from .sqlite import DB_FILE, MAX_PAGE, SCHEMA_VERSION, SQLiteReader, SQLiteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(url: str | None) -> bool:
    return url is not None and url.startswith(POSTGRES_SCHEMES)


def sqlite_path(state_dir: Path, url: str | None) -> Path:
    """The SQLite file: the one ``url`` names (a path), else ``capsule.db`` in the state directory."""
    return Path(url) if url else state_dir / DB_FILE


def open_store(state_dir: Path, url: str | None = None, app_name: str = "") -> TaskStore:
    """The supervisor's store: ``url`` a PostgreSQL URL, else SQLite (``sqlite_path``), created
    when missing. ``app_name`` names the PostgreSQL schema unless the URL says ``?schema=``."""
    if is_postgres(url):
        from .postgres import PostgresStore

        assert url is not None
        return PostgresStore(url, app_name)
    return SQLiteStore(sqlite_path(state_dir, url))


STORE_FILE = "store.json"  # in the state directory: which store its supervisor used, for readers


def without_password(url: str | None) -> str | None:
    """``url`` as it may be written down or shown: a PostgreSQL URL loses its password."""
    from urllib.parse import urlsplit, urlunsplit

    if not is_postgres(url):
        return url
    assert url is not None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1)))


def remember(state_dir: Path, url: str | None, app_name: str) -> None:
    """Note which store this state directory's supervisor uses (never a password), so a board or
    a command given only the state directory reads the same store."""
    url = without_password(url)
    path = state_dir / STORE_FILE
    tmp = path.with_name(f".{STORE_FILE}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"store": url, "app": app_name}))
        os.replace(tmp, path)
    except OSError:  # a full disk: readers fall back to what they are told (--store, the App)
        tmp.unlink(missing_ok=True)


def remembered(state_dir: Path) -> tuple[str | None, str]:
    """(store URL without its password, app name) the state directory's supervisor last used."""
    try:
        data = json.loads((state_dir / STORE_FILE).read_text())
        return data.get("store"), str(data.get("app") or "")
    except (OSError, ValueError, AttributeError):
        return None, ""


def open_reader(
    state_dir: Path, url: str | None = None, app_name: str = "", *, still: bool = False
) -> StoreReader | None:
    """A read-only view of the store, or None when no runtime ever ran there (SQLite: no file).
    Without ``url`` (or an app name), what the state directory's supervisor used (``remember``).
    ``still``: no supervisor writes it now, so reading must leave no file behind (``SQLiteReader``)."""
    if url is None or not app_name:
        known_url, known_app = remembered(state_dir)
        url, app_name = url or known_url, app_name or known_app
    if is_postgres(url):
        from .postgres import PostgresReader

        assert url is not None
        return PostgresReader(url, app_name)
    path = sqlite_path(state_dir, url)
    return SQLiteReader(path, still) if path.is_file() else None


__all__ = [
    "DB_FILE",
    "MAX_PAGE",
    "SCHEMA_VERSION",
    "Error",
    "NewTask",
    "ACTOR_EVENT_PREFIX",
    "ACTOR_EXIT",
    "FLOW_RECORD",
    "flow_kind",
    "StatsRows",
    "SQLiteReader",
    "SQLiteStore",
    "StoreReader",
    "StoredTask",
    "TaskStore",
    "STORE_FILE",
    "is_postgres",
    "remember",
    "sqlite_path",
    "without_password",
    "remembered",
    "open_reader",
    "open_store",
]
