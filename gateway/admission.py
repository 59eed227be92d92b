"""Admission control: under overload the gateway answers "busy" in bounded time instead of drowning.

Measured before this existed: at 10,000 connections clicks waited up to 8.7 s
and the gateway's RSS doubled; at 4,000, 129 requests timed out. The waiting
happened in three places, each now bounded:

- connections: past ``max_connections`` a new connection gets a canned
  ``503`` + ``Retry-After`` for each request, paced, without an aiohttp
  handler or its buffers (the RSS bound), and is closed after 5 s
  (``_Refusal``: the connection cap keeps the loop's lag bounded); a connection that has not sent a
  whole request head within ``header_timeout_ms`` gets ``408`` and is closed
  (slow-header clients otherwise hold a slot for aiohttp's keep-alive hour),
  and an idle keep-alive connection is closed after ``idle_timeout_ms``;
- the click and conversion batchers: an item that would wait longer than
  ``queue_budget_ms`` for its batch fails with ``QueueTimeout`` (refused at
  once when recent batches say it cannot go in time), answered ``503`` by
  the route's guard; it is never sent, so nothing is recorded that the
  caller was told failed.

Everything shed is counted in ``ascribe_gateway_shed_total{reason}``.

Not shed here: a request that waited for the event loop itself. Tried, and
under a closed-loop load (wrk) it made things worse: every shed request came
straight back, so the loop stayed as far behind and shed nearly everything
(59 clicks/s served at 10,000 connections). The connection cap is what keeps
the loop's lag bounded; the queue budget sheds what it cannot carry. The
health routes are never shed by the queue budget (they use no batcher), and
past the cap ``/healthz`` is still answered 200: a busy gateway is alive.

aiohttp has no hooks for a connection cap or a header timeout, so this module
runs the app itself (``run``, in place of ``web.run_app``) with a listening
site whose protocol factory wraps aiohttp's, and a ``RequestHandler``
subclass; tests/integration/test_gateway_admission.py pins the aiohttp
internals used here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
from contextlib import suppress
from typing import Any, cast

import orjson
from aiohttp import web, web_protocol
from aiohttp.web_server import Server

from gateway.config import Settings
from gateway.metrics import SHED_TOTAL

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# How long a connection past the cap is kept (answering 503s) before it is
# closed and its client may reconnect into a free slot. Every close is a
# reconnect under a closed-loop load, and that churn is what timed out: with
# wrk at 4,000 connections, 1 s gave 5 timeouts and a p99 of 1.9 s, 5 s none
# and 1.1 s (one run each on a loaded machine: indicative, not exact).
REFUSAL_LIFETIME_SECONDS = 5.0

_BUSY_BODY = orjson.dumps(
    {"error": {"code": "unavailable", "message": "the gateway is busy; try again", "field": None}}
)
_SLOW_BODY = orjson.dumps(
    {"error": {"code": "request_timeout", "message": "the request head did not arrive in time", "field": None}}
)
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def _raw_response(status_line: str, body: bytes, extra: str = "", *, keep_alive: bool = False) -> bytes:
    """A whole HTTP/1.1 answer, written to a socket without aiohttp's machinery."""
    connection = "" if keep_alive else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {status_line}\r\nContent-Type: {JSON_CONTENT_TYPE}\r\n{extra}"
        f"{connection}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


RAW_BUSY = _raw_response("503 Service Unavailable", _BUSY_BODY, f"Retry-After: {RETRY_AFTER_SECONDS}\r\n")
RAW_BUSY_KEEP = _raw_response(
    "503 Service Unavailable", _BUSY_BODY, f"Retry-After: {RETRY_AFTER_SECONDS}\r\n", keep_alive=True
)
RAW_SLOW_HEAD = _raw_response("408 Request Timeout", _SLOW_BODY)
# Liveness says only that the process serves, which it does even when full:
# a connection past the cap asking for it is answered, so no orchestrator
# restarts a gateway for being busy. (/readyz past the cap is 503: busy is not ready.)
_LIVENESS_REQUEST = b"GET /healthz "
RAW_ALIVE = _raw_response("200 OK", orjson.dumps({"status": "ok"}))
RAW_ALIVE_KEEP = _raw_response("200 OK", orjson.dumps({"status": "ok"}), keep_alive=True)
# What a refused connection reads of a request head at most, and what makes it
# close after answering (a body it will not read, or a client that asks).
_MAX_REFUSED_HEAD = 16 * 1024
_CLOSES = re.compile(rb"\r\n(?:content-length:\s*[1-9]|transfer-encoding:|connection:\s*close)", re.IGNORECASE)

SHED_QUEUE = SHED_TOTAL.labels("queue")
SHED_CONNECTIONS = SHED_TOTAL.labels("connections")
SLOW_HEADS = SHED_TOTAL.labels("slow_head")


def busy_response() -> web.Response:
    """``503`` with ``Retry-After`` for a request over the queue budget: come back, nothing was recorded."""
    SHED_QUEUE.inc()
    return web.Response(
        body=_BUSY_BODY,
        status=503,
        headers={"Content-Type": JSON_CONTENT_TYPE, "Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def raise_open_file_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (each connection is a descriptor); the new pair."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft != hard:
        # An unlimited hard limit cannot be a soft one on Linux; the kernel's
        # per-process ceiling (nr_open) is a safe, high figure.
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    return soft, hard


class AdmittingHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol, with a deadline on each request head (``header_timeout_ms``)."""

    def __init__(self, manager: Server, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = settings.header_timeout_ms / 1000
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A connection that never sends anything is a slow head too.
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._head_started is None and not self._request_in_progress and not self._messages:
            now = self._loop.time()
            self._head_started = now
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(now + self._head_timeout, self._head_too_slow)
        super().data_received(data)
        if self._messages and self._head_started is not None:
            # The head is whole (or refused by the parser): its clock stops.
            self._head_started = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        if self._head_started is None and self._request_count:
            return  # idle between requests: the keep-alive timeout's business
        SLOW_HEADS.inc()
        self.transport.write(RAW_SLOW_HEAD)
        self.force_close()


class _Refusal(asyncio.Protocol):
    """A connection past the cap: each request on it answered 503, paced, for ``lifetime``; then closed.

    Closing at once after one 503 was tried first: under a closed-loop load
    every refused client reconnected at once, and the handshakes, accepts and
    closes of that churn took the CPU the admitted clicks needed (230 clicks/s
    served at a cap of 256). Here a refused client keeps its connection for a
    while, each answer costs a few microseconds (no aiohttp request, no
    parse beyond finding the end of the head), and answers are paced
    (``pace`` apart), so a refused client cannot spin. After ``lifetime`` the
    last answer says ``Connection: close``: its next connection may find a free
    slot. A request with a body, or not HTTP/1.1 keep-alive, is answered and
    closed (its body is not read).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, pace: float, lifetime: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._pace = pace
        self._closing_at = loop.time() + lifetime
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None  # the next paced answer
        self._head_timer: asyncio.TimerHandle | None = None
        self._end_timer: asyncio.TimerHandle | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        self._transport = cast(asyncio.Transport, transport)
        # Nothing said in time: a 408, as on an admitted connection. (Answering
        # before the request arrives would race it: a close with its bytes
        # unread resets the connection, and the client may lose the answer.)
        self._head_timer = self._loop.call_later(self._timeout, self._finish, RAW_SLOW_HEAD)
        # Whatever it sends or not, a refused connection is gone by then.
        self._end_timer = self._loop.call_at(self._closing_at + self._timeout, self._end)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._head_timer is not None and b"\r\n\r\n" in self._buffer:
            self._head_timer.cancel()
            self._head_timer = None
        if self._timer is not None:
            return  # an answer is already scheduled; this waits its turn
        if len(self._buffer) > _MAX_REFUSED_HEAD:
            self._finish(RAW_BUSY)
        elif b"\r\n\r\n" in self._buffer:
            if self._buffer.startswith(_LIVENESS_REQUEST):
                self._answer()  # liveness is never kept waiting
            else:
                self._pause()
                self._timer = self._loop.call_later(self._pace, self._answer)

    def _pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def _answer(self) -> None:
        self._timer = None
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        liveness = head.startswith(_LIVENESS_REQUEST)
        if (
            self._loop.time() >= self._closing_at
            or not head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1")
            or _CLOSES.search(head) is not None
        ):
            self._finish(RAW_ALIVE if liveness else RAW_BUSY)
            return
        self._write(RAW_ALIVE_KEEP if liveness else RAW_BUSY_KEEP)
        if b"\r\n\r\n" in self._buffer:
            self._timer = self._loop.call_later(self._pace, self._answer)
        elif self._transport is not None:
            self._transport.resume_reading()

    def _end(self) -> None:
        """The refusal's time is up: a waiting request gets its 503, a partial head a 408, an idle one nothing."""
        self._end_timer = None
        if b"\r\n\r\n" in self._buffer:
            self._finish(RAW_BUSY)
        else:
            self._finish(RAW_SLOW_HEAD if self._buffer else b"")

    def _write(self, answer: bytes) -> None:
        if answer and self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)
            if answer is RAW_BUSY or answer is RAW_BUSY_KEEP:
                SHED_CONNECTIONS.inc()

    def _finish(self, answer: bytes) -> None:
        self._cancel_timers()
        self._write(answer)
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        self._transport = None
        self._buffer = b""

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._head_timer, self._end_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._head_timer = self._end_timer = None


class ConnectionCap:
    """The listening socket's protocol factory: aiohttp's handler, or a refusal past the cap."""

    def __init__(self, server: Server, settings: Settings) -> None:
        self._server = server
        self._settings = settings
        self._max = settings.max_connections
        self._loop = asyncio.get_running_loop()
        self._refusal_timeout = settings.header_timeout_ms / 1000
        self._refusal_pace = settings.queue_budget_ms / 1000
        # What aiohttp's Server.__call__ passes its RequestHandler (access log, timeouts).
        self._kwargs: dict[str, Any] = dict(server._kwargs)

    @property
    def open_connections(self) -> int:
        # The dict, not Server.connections: that property copies it into a list.
        return len(self._server._connections)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open_connections >= self._max:
            return _Refusal(self._loop, self._refusal_timeout, self._refusal_pace, REFUSAL_LIFETIME_SECONDS)
        return AdmittingHandler(self._server, settings=self._settings, loop=self._loop, **self._kwargs)


class AdmittingSite(web.TCPSite):
    """A TCP site whose connections go through ``ConnectionCap``."""

    __slots__ = ("_settings", "cap")

    def __init__(self, runner: web.BaseRunner, settings: Settings) -> None:
        super().__init__(runner, settings.host, settings.port, backlog=settings.listen_backlog)
        self._settings = settings
        self.cap: ConnectionCap | None = None

    async def start(self) -> None:
        self._runner._reg_site(self)
        server = self._runner.server
        assert server is not None
        self.cap = ConnectionCap(server, self._settings)
        self._server = await asyncio.get_running_loop().create_server(
            self.cap, self._host, self._port, backlog=self._backlog
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


async def start(app: web.Application, settings: Settings, **runner_args: Any) -> tuple[web.AppRunner, AdmittingSite]:
    """The app listening on ``settings.host:port`` (port 0: any) behind admission control."""
    runner = web.AppRunner(
        app,
        keepalive_timeout=settings.idle_timeout_ms / 1000,
        shutdown_timeout=settings.shutdown_grace_seconds,
        **runner_args,
    )
    await runner.setup()
    site = AdmittingSite(runner, settings)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def run(app: web.Application, settings: Settings, loop: asyncio.AbstractEventLoop, **runner_args: Any) -> None:
    """``web.run_app`` with admission control: serves until SIGTERM/SIGINT, then drains as it does."""
    soft, hard = raise_open_file_limit()
    logger.info("open-file limit %d (hard %d); at most %d connections", soft, hard, settings.max_connections)

    async def serve() -> None:
        runner, _ = await start(app, settings, handle_signals=True, **runner_args)
        try:
            while True:
                await asyncio.sleep(3600)
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        if rest:
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
