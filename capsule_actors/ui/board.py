"""TaskBoard: a live kanban of every task in one state directory, served on 127.0.0.1.

Where things live:

- ``board.py`` (this module): ``TaskBoard`` (binding 127.0.0.1, serving with uvicorn, start and
  stop) and the token gate ``_TokenGate`` (ASGI middleware in front of every route).
- ``data.py``: what the pages show: ``COLUMNS``, ``detail()`` (one task's detail view) and the
  live feed ``Feed``.
- ``routes.py``: every URL as a small named handler of ``BoardRoutes`` (``page``, ``favicon``,
  ``static``, ``api_board``, ``api_task``, ``api_cancel``, ``api_retry``, ``api_stream``), the
  lifespan that starts and stops the live feed, and ``build_app()``, which puts them into the
  Starlette app. ``TaskBoard.asgi()`` builds it, handing the handlers the state directory, the
  store reader, the page size and callables for the feed, the supervisor client and shutdown.

How it is built (see docs/ui.md):

- The page, its script and styles are static files of this package (no CDN, no build step).
- Lists and details are read straight from the task store through its read-only
  ``StoreReader`` (SQLite's WAL lets readers run beside the supervisor, the only writer). Every
  column is a page of at most ``page_size`` tasks plus a count, so 5,000 or 50,000 finished
  tasks cost the browser no more than 50.
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

Starlette and uvicorn are imported only when a board is built or served (``routes.py`` is
imported from ``TaskBoard.asgi()``, uvicorn in ``_make_server()``), so ``import capsule_actors``
(and every actor process) stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from .. import store
from ..bootstrap import resolve_state_dir, store_url
from ..errors import CapsuleError, ConfigError
from .data import COLUMNS, Feed

if TYPE_CHECKING:
    from ..app import App
    from ..client import Client

__all__ = ["COLUMNS", "TaskBoard"]

log = logging.getLogger("capsule_actors.board")

HOST = "127.0.0.1"
TOKEN_HEADER = "x-capsule-token"
_MAX_PAGE = store.MAX_PAGE


# ---- authentication --------------------------------------------------------------------------


class _TokenGate:
    """ASGI middleware: every HTTP request must carry the board's token (401 without, 403 wrong).

    Mounted under a path of another ASGI app (``root_path``), its redirect and cookie stay under
    that path."""

    def __init__(self, app: Any, token: str, port: Callable[[], int | None], hosts: tuple[str, ...]) -> None:
        self.app = app
        self._token = token.encode()
        self._port = port
        self._hosts = hosts

    @property
    def cookie(self) -> str:
        port = self._port()  # cookies ignore ports: one name per board (mounted: the host app's)
        return f"capsule_board_{port}" if port is not None else "capsule_board"

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
        if host.rsplit(":", 1)[0] not in self._hosts:
            await _plain(send, 403, f"forbidden: the board answers only to {' and '.join(self._hosts)}\n")
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
            if origin is not None and origin != f"{scope.get('scheme', 'http')}://{host}":
                await _plain(send, 403, "forbidden: cross-origin request\n")
                return
        root, path = scope.get("root_path", ""), scope["path"]  # mounted under a path: the page is at ROOT/
        route = path[len(root) :] if path.startswith(root) else path  # (older Starlette strips it)
        if from_query and scope["method"] == "GET" and route in ("/", ""):
            rest = {k: v for k, v in query.items() if k != "token"}
            location = root + "/" + ("?" + urlencode(rest, doseq=True) if rest else "")
            cookie = f"{self.cookie}={from_query}; Path={root}/; HttpOnly; SameSite=Strict"
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


class TaskBoard:
    """The task board of one runtime: ``TaskBoard(app).run()`` (blocking, Ctrl-C stops it), or
    ``with TaskBoard(app) as board: print(board.url)`` (served from a background thread).

    ``app``: an :class:`~capsule_actors.App` (its state directory), a state directory path, or
    None (``$CAPSULE_STATE_DIR``, else ``./.capsule``). It binds 127.0.0.1 only; ``port=0`` picks
    a free port. ``board.url`` carries the access token; ``board.token`` is the token itself.

    Inside another ASGI app: mount ``board.asgi()`` under a path (``Mount("/tasks",
    board.asgi())``) and open ``/tasks/?token=…``; the token is still required, and ``hosts``
    names the Host headers it answers (default 127.0.0.1 and localhost: list your site's name).
    """

    def __init__(
        self,
        app: App | str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        token: str | None = None,
        page_size: int = 50,
        store: str | None = None,
        hosts: tuple[str, ...] | list[str] = (HOST, "localhost"),
    ) -> None:
        from .. import store as stores
        from ..app import App

        if isinstance(app, App):
            self.state_dir = app.resolved_state_dir()
            reader = stores.open_reader(self.state_dir, store_url(store, app.store), app.name)
        else:
            self.state_dir = resolve_state_dir(app)
            reader = stores.open_reader(self.state_dir, store_url(store, None))
        if reader is None:
            raise ConfigError(
                f"no task store in {str(self.state_dir)!r}: start the runtime once first "
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
        if isinstance(hosts, str) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ConfigError(f"hosts={hosts!r}: expected a list of host names, e.g. ['127.0.0.1', 'localhost']")
        self.hosts = tuple(hosts)
        self.page_size = max(1, min(_MAX_PAGE, int(page_size)))
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._asgi: Any = None
        self.store = reader
        self._feed: Feed | None = None

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
        """The board as an ASGI app (Starlette, wrapped in the token gate), to serve or to mount
        under a path of another app (its page uses relative URLs; the live feed starts with the
        first page that follows it, so the host app need not run the board's lifespan)."""
        if self._asgi is None:
            from .routes import BoardRoutes, build_app  # imports Starlette

            handlers = BoardRoutes(
                state_dir=self.state_dir,
                reader=self.store,
                page_size=self.page_size,
                feed=lambda: self._feed,
                start_feed=self._start_feed,
                connection=self._connection,
                stopping=self._stopping,
            )
            self._asgi = _TokenGate(build_app(handlers), self.token, lambda: self._bound_port, self.hosts)
        return self._asgi

    def _stopping(self) -> bool:
        return self._server is not None and bool(self._server.should_exit)

    def _start_feed(self, after: int) -> Feed:
        """The board's live feed from event ``after`` on (the app's lifespan runs it)."""
        self._feed = Feed(self.state_dir, after)
        return self._feed

    def _connection(self) -> Client | None:
        feed = self._feed or Feed(self.state_dir, 0)
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
