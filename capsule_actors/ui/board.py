"""TaskBoard: a live kanban of every task in one state directory, served on 127.0.0.1.

How it is built (see docs/ui.md):

- The page, its script and styles are static files of this package (no CDN, no build step).
- Lists and details are read straight from ``capsule.db``, opened read-only
  (``file:...?mode=ro``; WAL lets readers run beside the supervisor, the only writer). Every
  column is a page of at most ``page_size`` tasks (LIMIT/OFFSET) plus a count, so 5,000 or
  50,000 finished tasks cost the browser no more than 50.
- The live feed is one long poll of ``AllEvents`` on the supervisor connection, fanned out to
  every open page as server-sent events; a page refreshes what changed (debounced).
- Cancel and Retry are POSTs that go to the supervisor (``Cancel``, ``Retry``).
- Every request needs the board's token (``secrets.token_urlsafe(32)``, compared with
  ``hmac.compare_digest``): ``?token=`` on the first page load, which sets an HttpOnly,
  SameSite=Strict cookie and redirects to a URL without it; or an ``X-Capsule-Token`` /
  ``Authorization: Bearer`` header. No token: 401; a wrong one: 403. The Host header must be
  127.0.0.1 or localhost (DNS rebinding), and a cookie-authenticated POST from another Origin is
  refused.
- Task arguments and results are cloudpickle bytes: the board shows their size and never
  unpickles them.

Starlette and uvicorn are imported only when a board is built or served, so ``import
capsule_actors`` (and every actor process) stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from .. import messages
from ..errors import CapsuleError, ConfigError, NotRunning, UnknownTask
from ..transport import read_runtime_file, resolve_state_dir

if TYPE_CHECKING:
    from ..app import App
    from ..client import Connection

__all__ = ["COLUMNS", "BoardStore", "TaskBoard"]

log = logging.getLogger("capsule_actors.board")

COLUMNS = ("QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
HOST = "127.0.0.1"
DB_FILE = "capsule.db"
TOKEN_HEADER = "x-capsule-token"
_STATIC = {"board.js": "text/javascript", "board.css": "text/css", "card.css": "text/css"}
_ORDER = {
    "QUEUED": "created_at ASC, id ASC",  # next to run first
    "SCHEDULED": "coalesce(run_at, created_at) ASC, id ASC",  # next due first
    "RUNNING": "started_at DESC, id DESC",
    "SUCCEEDED": "finished_at DESC, id DESC",  # most recent first
    "FAILED": "finished_at DESC, id DESC",
    "CANCELLED": "finished_at DESC, id DESC",
}
_ROW = (
    "id, name, state, attempts, lock_key, session_id, created_at, started_at, finished_at, run_at, "
    "progress, error_type, error_message, slot"
)
_MAX_PAGE = 200
_DETAIL_EVENTS = 200
_KEEPALIVE = 10.0
_ACTION_TIMEOUT = 15.0


# ---- reading the store (read-only) -----------------------------------------------------------


def _filters(name: str | None, session: str | None, lock: str | None) -> tuple[str, list[Any]]:
    """Substring filters (case-sensitive) on name, session id and lock key."""
    where, params = [], []
    for column, value in (("name", name), ("session_id", session), ("lock_key", lock)):
        if value:
            where.append(f"instr({column}, ?) > 0")
            params.append(value)
    return (" AND ".join(where) or "1"), params


def _row(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    etype, emsg = d.pop("error_type"), d.pop("error_message")
    d["error"] = f"{etype}: {emsg or ''}" if etype else None
    return d


class BoardStore:
    """Read-only queries on ``capsule.db`` for the board; one connection per thread."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"file:{quote(str(self.path))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def last_seq(self) -> int:
        row = self._db().execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def board(
        self,
        *,
        name: str | None = None,
        session: str | None = None,
        lock: str | None = None,
        offsets: dict[str, int] | None = None,
        page_size: int = 50,
        names: bool = False,
    ) -> dict[str, Any]:
        """Every column: its count under the filters and one page of tasks."""
        db = self._db()
        where, params = _filters(name, session, lock)
        offsets = offsets or {}
        page_size = max(1, min(_MAX_PAGE, page_size))
        db.execute("BEGIN")  # one snapshot for counts and pages
        try:
            counts = dict(
                db.execute(f"SELECT state, count(*) FROM tasks WHERE {where} GROUP BY state", params).fetchall()
            )
            columns = []
            for state in COLUMNS:
                count = int(counts.get(state, 0))
                offset = max(0, min(int(offsets.get(state, 0)), max(0, count - 1)))
                offset -= offset % page_size
                rows = db.execute(
                    f"SELECT {_ROW} FROM tasks WHERE state=? AND {where} ORDER BY {_ORDER[state]} LIMIT ? OFFSET ?",
                    [state, *params, page_size, offset],
                ).fetchall()
                columns.append({"state": state, "count": count, "offset": offset, "tasks": [_row(r) for r in rows]})
            seq = int(db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0)
            out: dict[str, Any] = {
                "columns": columns,
                "seq": seq,
                "page_size": page_size,
                "total": sum(int(v) for v in counts.values()),
            }
            if names:
                out["names"] = [r[0] for r in db.execute("SELECT DISTINCT name FROM tasks ORDER BY name LIMIT 500")]
        finally:
            db.execute("COMMIT")
        return out

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One task in detail: record, sizes of its pickled arguments/result (never their
        contents), traceback, and its last events."""
        db = self._db()
        db.execute("BEGIN")
        try:
            row = db.execute(
                f"SELECT {_ROW}, session_owner, traceback, length(args) AS args_bytes, "
                "length(result) AS result_bytes FROM tasks WHERE id=?",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            out = _row(row)
            events = db.execute(
                "SELECT seq, kind, data, ts, session_id FROM events WHERE task_id=? ORDER BY seq DESC LIMIT ?",
                (task_id, _DETAIL_EVENTS + 1),
            ).fetchall()
            n_events = int(db.execute("SELECT count(*) FROM events WHERE task_id=?", (task_id,)).fetchone()[0])
        finally:
            db.execute("COMMIT")
        out["events"] = [
            {"seq": e[0], "kind": e[1], "data": _json(e[2]), "ts": e[3], "session_id": e[4]}
            for e in reversed(events[:_DETAIL_EVENTS])
        ]
        out["events_total"] = n_events
        out["message"] = next(
            (
                e["data"].get("message")
                for e in reversed(out["events"])
                if e["kind"] == "progress" and isinstance(e["data"], dict)
            ),
            None,
        )
        out["args"] = {
            "bytes": out.pop("args_bytes") or 0,
            "format": "cloudpickle",
            "summary": "pickled arguments (not unpickled by the board)",
        }
        result_bytes = out.pop("result_bytes")
        out["result"] = None if not result_bytes else {"bytes": result_bytes, "format": "cloudpickle"}
        return out


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- the live feed ---------------------------------------------------------------------------


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class _Feed:
    """One ``AllEvents`` long poll on the supervisor, fanned out to every open page."""

    def __init__(self, state_dir: Path, after: int) -> None:
        self.state_dir = state_dir
        self.after = after
        self.online = False
        self.queues: set[asyncio.Queue[str]] = set()

    def subscribe(self) -> asyncio.Queue[str]:
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        self.queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[str]) -> None:
        self.queues.discard(q)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        msg = _sse(event, data)
        for q in list(self.queues):
            if q.full():  # a slow page: drop its oldest message (each one just says "refresh")
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(msg)

    def connection(self) -> Connection | None:
        """The supervisor connection, or None when no supervisor runs for the state dir."""
        from ..client import Connection

        if read_runtime_file(self.state_dir) is None:
            return None
        try:
            return Connection.for_state_dir(self.state_dir)
        except NotRunning:
            return None

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                conn = await asyncio.to_thread(self.connection)
                if conn is None:
                    await asyncio.sleep(1.0)
                    continue
                try:
                    body, _ = await conn.acall(lambda req: messages.AllEvents(req, self.after))
                except CapsuleError as exc:
                    log.debug("board feed: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                events = body.get("events") or []
                if events:
                    self.after = max(self.after, int(events[-1]["seq"]))
                    ids = sorted({e["task_id"] for e in events})
                    self.publish("tasks", {"seq": self.after, "n": len(events), "ids": ids[:500]})
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        """Tell the pages when the supervisor comes and goes."""
        while True:
            conn = await asyncio.to_thread(self.connection)
            online = conn is not None and conn.connected
            if online != self.online:
                self.online = online
                self.publish("status", {"online": online})
            await asyncio.sleep(0.25)


# ---- authentication --------------------------------------------------------------------------


class _TokenGate:
    """ASGI middleware: every HTTP request must carry the board's token (401 without, 403 wrong)."""

    def __init__(self, app: Any, token: str, port: Callable[[], int]) -> None:
        self.app = app
        self._token = token.encode()
        self._port = port

    @property
    def cookie(self) -> str:
        return f"capsule_board_{self._port()}"  # cookies ignore ports: one name per board

    def _valid(self, given: str) -> bool:
        import hmac

        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host.rsplit(":", 1)[0] not in (HOST, "localhost"):
            await _plain(send, 403, "forbidden: the board answers only to 127.0.0.1 and localhost\n")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        from_query = (query.get("token") or [None])[0]
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        cookie_value = None
        if "cookie" in headers:
            from http.cookies import SimpleCookie

            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(headers["cookie"])
            morsel = jar.get(self.cookie)
            cookie_value = morsel.value if morsel is not None else None
        given = from_query or headers.get(TOKEN_HEADER) or bearer or cookie_value
        if not given:
            await _plain(
                send,
                401,
                "unauthorized: this board needs its access token; open the URL that "
                "`capsule-actors board` printed (http://127.0.0.1:PORT/?token=...)\n",
                {"www-authenticate": 'Bearer realm="capsule-actors board"'},
            )
            return
        if not self._valid(given):
            await _plain(send, 403, "forbidden: wrong board token\n")
            return
        if (
            scope["method"] not in ("GET", "HEAD")
            and given == cookie_value
            and not any((from_query, headers.get(TOKEN_HEADER), bearer))
        ):
            origin = headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                await _plain(send, 403, "forbidden: cross-origin request\n")
                return
        if from_query and scope["method"] == "GET" and scope["path"] == "/":
            rest = {k: v for k, v in query.items() if k != "token"}
            location = "/" + ("?" + urlencode(rest, doseq=True) if rest else "")
            cookie = f"{self.cookie}={from_query}; Path=/; HttpOnly; SameSite=Strict"
            await _plain(send, 303, "see /\n", {"location": location, "set-cookie": cookie})
            return
        await self.app(scope, receive, send)


async def _plain(send: Any, status: int, text: str, extra: dict[str, str] | None = None) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"referrer-policy", b"no-referrer"),
    ]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- the board -------------------------------------------------------------------------------

_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
}


def _static(name: str) -> str:
    return resources.files(__package__).joinpath(f"static/{name}").read_text(encoding="utf-8")


class TaskBoard:
    """The task board of one runtime: ``TaskBoard(app).run()`` (blocking, Ctrl-C stops it), or
    ``with TaskBoard(app) as board: print(board.url)`` (served from a background thread).

    ``app``: an :class:`~capsule_actors.App` (its state directory), a state directory path, or
    None (``$CAPSULE_STATE_DIR``, else ``./.capsule``). It binds 127.0.0.1 only; ``port=0`` picks
    a free port. ``board.url`` carries the access token; ``board.token`` is the token itself.
    """

    def __init__(
        self,
        app: App | str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        token: str | None = None,
        page_size: int = 50,
    ) -> None:
        from ..app import App

        if isinstance(app, App):
            self.state_dir = app.resolved_state_dir()
        else:
            self.state_dir = resolve_state_dir(app)
        self.db_path = self.state_dir / DB_FILE
        if not self.db_path.is_file():
            raise ConfigError(
                f"no task store at {str(self.db_path)!r}: start the runtime once first "
                "(`capsule-actors run MODULE:APP`, or `with app.start():`)"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port={port!r}: expected 0..65535 (0 = any free port)")
        if token is not None and not (
            len(token) >= 16 and all(c.isascii() and (c.isalnum() or c in "-_.~") for c in token)
        ):
            raise ConfigError("a board token must be at least 16 characters of A-Z a-z 0-9 - _ . ~")
        if token is None:
            import secrets

            token = secrets.token_urlsafe(32)
        self.token = token
        self.page_size = max(1, min(_MAX_PAGE, int(page_size)))
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._asgi: Any = None
        self.store = BoardStore(self.db_path)
        self._feed: _Feed | None = None

    # ---- addresses ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (binds now if needed, so ``port=0`` resolves to a real one)."""
        if self._bound_port is None:
            self._bind()
        assert self._bound_port is not None
        return self._bound_port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/?token=…``: what to open in a browser."""
        return f"http://{HOST}:{self.port}/?token={self.token}"

    def _bind(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, self._requested_port))
            except OSError as exc:
                sock.close()
                raise ConfigError(
                    f"cannot listen on {HOST}:{self._requested_port}: {exc.strerror}; "
                    "pick another port (--port, 0 = any free port)"
                ) from None
            sock.listen(128)
            self._sock = sock
            self._bound_port = int(sock.getsockname()[1])
        return self._sock

    # ---- the ASGI application ----------------------------------------------------------------
    def asgi(self) -> Any:
        """The board as an ASGI app (Starlette, wrapped in the token gate)."""
        if self._asgi is None:
            self._asgi = _TokenGate(self._starlette(), self.token, lambda: self.port)
        return self._asgi

    def _stopping(self) -> bool:
        return self._server is not None and bool(self._server.should_exit)

    def _starlette(self) -> Any:  # noqa: C901 - the routes read best side by side
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        board = self

        def json_response(data: Any, status: int = 200) -> Response:
            return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})

        async def page(request: Request) -> Response:
            html = _static("board.html").replace("{{STATE_DIR}}", _esc(str(board.state_dir)))
            return Response(html, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

        async def static(request: Request) -> Response:
            name = request.path_params["name"]
            if name not in _STATIC:
                return Response("not found\n", status_code=404, media_type="text/plain")
            return Response(
                _static(name),
                media_type=f"{_STATIC[name]}; charset=utf-8",
                headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
            )

        async def favicon(request: Request) -> Response:
            return Response(status_code=204)

        async def api_board(request: Request) -> Response:
            q = request.query_params
            offsets = {}
            for state in COLUMNS:
                with contextlib.suppress(ValueError):
                    offsets[state] = max(0, int(q.get(f"offset_{state}", "0")))
            try:
                page_size = int(q.get("page_size", board.page_size))
            except ValueError:
                page_size = board.page_size
            data = await run_in_threadpool(
                board.store.board,
                name=q.get("name") or None,
                session=q.get("session") or None,
                lock=q.get("lock") or None,
                offsets=offsets,
                page_size=page_size,
                names=q.get("names") == "1",
            )
            feed = board._feed
            data.update(now=time.time(), online=bool(feed and feed.online), state_dir=str(board.state_dir))
            return json_response(data)

        async def api_task(request: Request) -> Response:
            task_id = request.path_params["task_id"]
            data = await run_in_threadpool(board.store.task, task_id) if len(task_id) <= 64 else None
            if data is None:
                return json_response({"error": f"no task with id {task_id!r}"}, 404)
            data["now"] = time.time()
            return json_response(data)

        async def act(request: Request, make: Callable[[int, str], messages.Message]) -> tuple[Any, Response | None]:
            task_id = request.path_params["task_id"]
            if len(task_id) > 64:
                return None, json_response({"error": f"no task with id {task_id!r}"}, 404)
            conn = await asyncio.to_thread(board._connection)
            if conn is None:
                return None, json_response(
                    {
                        "error": f"no supervisor is running for {str(board.state_dir)!r}: start it with "
                        "`capsule-actors run MODULE:APP`"
                    },
                    503,
                )
            try:
                body, _ = await asyncio.wait_for(conn.acall(lambda req: make(req, task_id)), _ACTION_TIMEOUT)
            except UnknownTask as exc:
                return None, json_response({"error": str(exc)}, 404)
            except ConfigError as exc:
                return None, json_response({"error": str(exc)}, 409)
            except NotRunning as exc:
                return None, json_response({"error": str(exc)}, 503)
            except TimeoutError:
                return None, json_response({"error": f"the supervisor did not answer within {_ACTION_TIMEOUT} s"}, 504)
            except CapsuleError as exc:
                return None, json_response({"error": f"{type(exc).__name__}: {exc}"}, 500)
            return body, None

        async def api_cancel(request: Request) -> Response:
            body, error = await act(request, messages.Cancel)
            if error is not None:
                return error
            return json_response({"ok": True, "cancelled": bool(body), "task_id": request.path_params["task_id"]})

        async def api_retry(request: Request) -> Response:
            body, error = await act(request, messages.Retry)
            if error is not None:
                return error
            new_id, dedup, conflict, _pushed = body["items"][0]
            if conflict:
                return json_response(
                    {"error": f"its lock key is held by live task {new_id} (on_conflict='reject')", "holder": new_id},
                    409,
                )
            return json_response(
                {"ok": True, "task_id": new_id, "deduplicated": bool(dedup), "retry_of": request.path_params["task_id"]}
            )

        async def api_stream(request: Request) -> Response:
            feed = board._feed
            if feed is None:
                return json_response({"error": "the live feed is not running"}, 503)
            q = feed.subscribe()

            async def events() -> Any:
                try:
                    yield "retry: 2000\n" + _sse("hello", {"online": feed.online, "seq": feed.after})
                    last = time.monotonic()
                    while not board._stopping():
                        try:
                            msg = await asyncio.wait_for(q.get(), 1.0)
                        except TimeoutError:
                            if time.monotonic() - last >= _KEEPALIVE:
                                last = time.monotonic()
                                yield ": keepalive\n\n"
                            continue
                        last = time.monotonic()
                        yield msg
                finally:
                    feed.unsubscribe(q)

            return StreamingResponse(
                events(),
                media_type="text/event-stream",
                headers={"cache-control": "no-store", "x-accel-buffering": "no"},
            )

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> Any:
            after = await run_in_threadpool(board.store.last_seq)
            board._feed = _Feed(board.state_dir, after)
            task = asyncio.create_task(board._feed.run())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

        routes = [
            Route("/", page, methods=["GET"]),
            Route("/favicon.ico", favicon, methods=["GET"]),
            Route("/static/{name}", static, methods=["GET"]),
            Route("/api/board", api_board, methods=["GET"]),
            Route("/api/stream", api_stream, methods=["GET"]),
            Route("/api/tasks/{task_id}", api_task, methods=["GET"]),
            Route("/api/tasks/{task_id}/cancel", api_cancel, methods=["POST"]),
            Route("/api/tasks/{task_id}/retry", api_retry, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    def _connection(self) -> Connection | None:
        feed = self._feed or _Feed(self.state_dir, 0)
        return feed.connection()

    # ---- serving -----------------------------------------------------------------------------
    def _make_server(self) -> Any:
        import uvicorn

        class Server(uvicorn.Server):  # type: ignore[misc, unused-ignore]
            """Signals are ours (see run()): uvicorn would re-raise SIGINT after a clean stop."""

            def install_signal_handlers(self) -> None:  # uvicorn < 0.29
                pass

            @contextlib.contextmanager
            def capture_signals(self) -> Any:  # uvicorn >= 0.29
                yield

        config = uvicorn.Config(
            self.asgi(),
            log_level="warning",
            access_log=False,
            lifespan="on",
            http="h11",
            ws="none",
            loop="asyncio",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=3,
        )
        self._server = Server(config)
        return self._server

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or :meth:`stop`; ``on_ready(url)`` is
        called once the port is bound (the CLI prints the URL there)."""
        sock = self._bind()
        server = self._make_server()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def stop(signum: int, frame: Any) -> None:
                if server.should_exit:  # a second signal: do not wait for open connections
                    server.force_exit = True
                server.should_exit = True

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, stop)
        if on_ready is not None:
            on_ready(self.url)
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()

    def start(self, timeout: float = 15.0) -> TaskBoard:
        """Serve from a background thread; returns once the board answers requests."""
        if self._thread is not None:
            return self
        sock = self._bind()
        server = self._make_server()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="capsule-board", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise CapsuleError("the task board failed to start (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise CapsuleError(f"the task board did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a board served by :meth:`start` (bounded)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self.store.close()

    def __enter__(self) -> TaskBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"http://{HOST}:{self._bound_port}/" if self._bound_port else "not bound"
        return f"<TaskBoard {self.state_dir} {where}>"


def _esc(text: str) -> str:
    import html

    return html.escape(text)
