"""A real HTTP receiver for webhook tests: records every request, answers what the test scripts."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # the event loop's time when it arrived


@dataclass
class Receiver:
    # Answers per request: the status and extra headers; default 200.
    answer: Callable[[Received], tuple[int, dict[str, str]]] = lambda _: (200, {})
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    # Seconds each answer takes (a slow receiver keeps deliveries in flight).
    delay: float = 0.0
    # Requests being answered now, and the most at once.
    in_flight: int = 0
    peak_in_flight: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        seen = Received(request.method, request.path_qs, dict(request.headers), await request.read(),
                        asyncio.get_running_loop().time())
        self.received.append(seen)
        self.arrived.set()
        status, headers = self.answer(seen)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.Response(status=status, headers=headers, text="ok")

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Waits until ``count`` requests arrived (TimeoutError naming what did)."""
        async def enough() -> None:
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{len(self.received)} of {count} requests arrived: {self.received}") from None
        return list(self.received)
