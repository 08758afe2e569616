"""The task board's HTTP routes: one small handler per URL, and :func:`build_app`, which puts them
and the lifespan that runs the live feed into a Starlette app.

Each route is one method of :class:`BoardRoutes` (its docstring says what it answers):

- ``GET /``: ``page`` (the HTML page); ``GET /favicon.ico``: ``favicon``; ``GET /static/{name}``:
  ``static`` (board.js, board.css, card.css).
- ``GET /stats``: ``stats_page`` (the Stats view); ``GET /api/stats``: ``api_stats`` (its series,
  from the store: ``ui/stats.py``).
- ``GET /api/board``: ``api_board`` (a page of tasks per column, ``?id=`` finds one by its id or
  short id); ``GET /api/tasks/{task_id}``: ``api_task`` (one task's detail; a short id works).
  Both read the task store.
- ``POST /api/tasks/{task_id}/cancel`` and ``…/retry``: ``api_cancel``, ``api_retry`` (``Cancel``
  and ``Retry`` to the supervisor, through ``_act``).
- ``GET /api/stream``: ``api_stream`` (the live feed as server-sent events); ``lifespan`` starts
  and stops that feed with the app.

The handlers get what they use in :class:`BoardRoutes`' constructor (the state directory, the
store reader, the page size, and callables for the live feed, the supervisor client and "is the
server stopping"), never the :class:`~capsule_actors.ui.board.TaskBoard` itself. The token gate,
binding and serving stay in ``board.py``, which imports this module only when it builds the app:
this module imports Starlette at the top, so ``import capsule_actors`` must never reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import ids, messages, store
from ..errors import CapsuleError, ConfigError, NotRunning, UnknownTask
from .data import COLUMNS, Feed, detail, sse
from .stats import stats

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["BoardRoutes", "build_app"]

_STATIC = {
    "board.js": "text/javascript",
    "board.css": "text/css",
    "card.css": "text/css",
    "stats.js": "text/javascript",
    "stats.css": "text/css",
}
_MAX_TASK_ID = 64
_KEEPALIVE = 10.0
_ACTION_TIMEOUT = 15.0
_REFUSALS: tuple[tuple[type[CapsuleError], int], ...] = ((UnknownTask, 404), (ConfigError, 409), (NotRunning, 503))

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

Action = Callable[[int, str], messages.Message]


def _json(data: Any, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})


def _no_task(task_id: str) -> Response:
    return _json({"error": f"no task with id {task_id!r}"}, 404)


def _static(name: str) -> str:
    return resources.files(__package__).joinpath(f"static/{name}").read_text(encoding="utf-8")


def _refusal(exc: CapsuleError) -> Response:
    """The answer to an action the supervisor refused (or that failed on the way)."""
    for kind, status in _REFUSALS:
        if isinstance(exc, kind):
            return _json({"error": str(exc)}, status)
    return _json({"error": f"{type(exc).__name__}: {exc}"}, 500)


class BoardRoutes:
    """The board's route handlers, over what they read: ``state_dir`` (shown on the page and in
    errors), ``reader`` (the task store), ``page_size`` (a column's default page), ``feed()`` (the
    live feed, None until the lifespan starts it), ``start_feed(after)`` (creates the board's
    feed from event ``after`` on), ``connection()`` (the supervisor's client, None when none
    runs) and ``stopping()`` (the server is shutting down: end the event streams)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        reader: store.StoreReader,
        page_size: int,
        feed: Callable[[], Feed | None],
        start_feed: Callable[[int], Feed],
        connection: Callable[[], Client | None],
        stopping: Callable[[], bool],
    ) -> None:
        self.state_dir = state_dir
        self.reader = reader
        self.page_size = page_size
        self._feed = feed
        self._start_feed = start_feed
        self._connection = connection
        self._stopping = stopping
        self._feed_task: asyncio.Task[None] | None = None

    # ---- the page ----------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        """``GET /``: the board's HTML page, with its state directory filled in."""
        text = _static("board.html").replace("{{STATE_DIR}}", html.escape(str(self.state_dir)))
        return Response(text, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

    async def stats_page(self, request: Request) -> Response:
        """``GET /stats``: the Stats view's HTML page (charts drawn by stats.js from ``api/stats``)."""
        text = _static("stats.html").replace("{{STATE_DIR}}", html.escape(str(self.state_dir)))
        return Response(text, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

    async def static(self, request: Request) -> Response:
        """``GET /static/{name}``: the page's script and styles (404 for any other name)."""
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(
            _static(name),
            media_type=f"{_STATIC[name]}; charset=utf-8",
            headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
        )

    async def favicon(self, request: Request) -> Response:
        """``GET /favicon.ico``: 204, the board has no icon."""
        return Response(status_code=204)

    # ---- reads from the store ----------------------------------------------------------------
    async def api_board(self, request: Request) -> Response:
        """``GET /api/board``: one page of tasks and a count per column, filtered by the query."""
        q = request.query_params
        offsets = {}
        for state in COLUMNS:
            with contextlib.suppress(ValueError):
                offsets[state] = max(0, int(q.get(f"offset_{state}", "0")))
        try:
            page_size = int(q.get("page_size", self.page_size))
        except ValueError:
            page_size = self.page_size
        data = await run_in_threadpool(
            self.reader.board,
            name=q.get("name") or None,
            session=q.get("session") or None,
            lock=q.get("lock") or None,
            task_id=q.get("id") or None,
            offsets=offsets,
            page_size=page_size,
            names=q.get("names") == "1",
        )
        feed = self._feed()
        data.update(now=time.time(), online=bool(feed and feed.online), state_dir=str(self.state_dir))
        return _json(data)

    async def api_stats(self, request: Request) -> Response:
        """``GET /api/stats?window=hour|day``: the Stats view's series, from the store (400 for
        another window)."""
        try:
            data = await run_in_threadpool(stats, self.reader, request.query_params.get("window", "hour"), time.time())
        except ConfigError as exc:
            return _json({"error": str(exc)}, 400)
        return _json(data)

    async def api_task(self, request: Request) -> Response:
        """``GET /api/tasks/{task_id}``: one task's detail view (404 when there is no such task)."""
        task_id = request.path_params["task_id"]
        try:
            data = await run_in_threadpool(self._detail, task_id) if len(task_id) <= _MAX_TASK_ID else None
        except ConfigError as exc:  # a short id that several tasks end with
            return _refusal(exc)
        if data is None:
            return _no_task(task_id)
        data["now"] = time.time()
        return _json(data)

    def _detail(self, task_id: str) -> dict[str, Any] | None:
        """The detail of the task ``task_id`` names (a full or a short id: ``ids.resolve``)."""
        try:
            return detail(self.reader, ids.resolve(task_id, self.reader.find_ids))
        except UnknownTask:
            return None

    # ---- actions on the supervisor -----------------------------------------------------------
    async def api_cancel(self, request: Request) -> Response:
        """``POST /api/tasks/{task_id}/cancel``: whether the supervisor cancelled the task."""
        task_id = request.path_params["task_id"]
        body, error = await self._act(task_id, messages.Cancel)
        if error is not None:
            return error
        return _json({"ok": True, "cancelled": bool(body), "task_id": task_id})

    async def api_retry(self, request: Request) -> Response:
        """``POST /api/tasks/{task_id}/retry``: the new task's id (409 when its lock key is held)."""
        task_id = request.path_params["task_id"]
        body, error = await self._act(task_id, messages.Retry)
        if error is not None:
            return error
        item = messages.SubmitAck.from_wire(body).items[0]
        if item.conflict:
            return _json(
                {
                    "error": f"its lock key is held by live task {item.task_id} (on_conflict='reject')",
                    "holder": item.task_id,
                },
                409,
            )
        return _json({"ok": True, "task_id": item.task_id, "deduplicated": item.deduplicated, "retry_of": task_id})

    async def _act(self, task_id: str, make: Action) -> tuple[Any, Response | None]:
        """Send ``make(req, task_id)`` to the supervisor: (its answer, None) or (None, an error)."""
        if len(task_id) > _MAX_TASK_ID:
            return None, _no_task(task_id)
        conn = await asyncio.to_thread(self._connection)
        if conn is None:
            return None, _json(
                {
                    "error": f"no supervisor is running for {str(self.state_dir)!r}: start it with "
                    "`capsule-actors run MODULE:APP`"
                },
                503,
            )
        try:
            body, _ = await asyncio.wait_for(conn.acall(lambda req: make(req, task_id)), _ACTION_TIMEOUT)
        except (UnknownTask, ConfigError, NotRunning) as exc:
            return None, _refusal(exc)
        except TimeoutError:  # before CapsuleError: a TaskTimeout is both
            return None, _json({"error": f"the supervisor did not answer within {_ACTION_TIMEOUT} s"}, 504)
        except CapsuleError as exc:
            return None, _refusal(exc)
        return body, None

    # ---- the live feed -----------------------------------------------------------------------
    async def api_stream(self, request: Request) -> Response:
        """``GET /api/stream``: the live feed as server-sent events (503 when it is not running)."""
        feed = await self._running_feed()
        return StreamingResponse(
            self._events(feed, feed.subscribe()),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _events(self, feed: Feed, q: asyncio.Queue[str]) -> AsyncIterator[str]:
        """A hello, then every message of ``q``, with a keepalive comment after 10 s of quiet."""
        try:
            yield "retry: 2000\n" + sse("hello", {"online": feed.online, "seq": feed.after})
            last = time.monotonic()
            while not self._stopping():
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

    async def _running_feed(self) -> Feed:
        """The live feed, started (from the store's last event on) by the lifespan, or by the first
        stream request when the board is mounted in an app that does not run its lifespan."""
        feed = self._feed()
        if feed is None:
            after = await run_in_threadpool(self.reader.last_seq)
            feed = self._feed()  # another request may have started it meanwhile
            if feed is None:
                feed = self._start_feed(after)
                self._feed_task = asyncio.create_task(feed.run())
        return feed

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Run the live feed while the app serves."""
        await self._running_feed()
        try:
            yield
        finally:
            task, self._feed_task = self._feed_task, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def build_app(handlers: BoardRoutes) -> Starlette:
    """The board's Starlette app: every route above and the lifespan that runs the live feed."""
    routes = [
        Route("/", handlers.page, methods=["GET"]),
        Route("/favicon.ico", handlers.favicon, methods=["GET"]),
        Route("/static/{name}", handlers.static, methods=["GET"]),
        Route("/stats", handlers.stats_page, methods=["GET"]),
        Route("/api/board", handlers.api_board, methods=["GET"]),
        Route("/api/stats", handlers.api_stats, methods=["GET"]),
        Route("/api/stream", handlers.api_stream, methods=["GET"]),
        Route("/api/tasks/{task_id}", handlers.api_task, methods=["GET"]),
        Route("/api/tasks/{task_id}/cancel", handlers.api_cancel, methods=["POST"]),
        Route("/api/tasks/{task_id}/retry", handlers.api_retry, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=handlers.lifespan)
