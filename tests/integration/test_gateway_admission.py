"""Admission control on a real listening socket: the connection cap, the head timeout, the backlog.

The app served is a small one with the gateway's admission control in front
(gateway.admission.start), so each case controls what a handler costs; the
batcher's time budget is tested in tests/unit/test_batcher.py and end to end,
under real overload, in tests/e2e/test_overload.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest
from aiohttp import web

from gateway import admission
from gateway.admission import AdmittingSite
from gateway.config import Settings
from gateway.metrics import SHED_TOTAL

SETTINGS = Settings(host="127.0.0.1", port=0, max_connections=3, header_timeout_ms=400, queue_budget_ms=100)


def _app() -> web.Application:
    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/healthz", fast)
    return app


@pytest.fixture
async def served() -> AsyncIterator[AdmittingSite]:
    runner, site = await admission.start(_app(), SETTINGS)
    try:
        yield site
    finally:
        await runner.cleanup()


def _shed(reason: str) -> float:
    return float(SHED_TOTAL.labels(reason)._value.get())


async def _exchange(port: int, raw: bytes, *, read_timeout: float = 3.0) -> bytes:
    """Sends ``raw`` and reads until the server closes (or ``read_timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if raw:
            writer.write(raw)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


def _get(path: str, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{connection}\r\n".encode()


def _status_and_body(answer: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


async def test_a_served_request_is_unaffected(served: AdmittingSite) -> None:
    status, _, body = _status_and_body(await _exchange(served.port, _get("/fast")))
    assert (status, orjson.loads(body)) == (200, {"ok": True})


async def test_a_head_that_never_completes_gets_408_and_the_connection_closes(served: AdmittingSite) -> None:
    before = _shed("slow_head")
    began = time.monotonic()
    answer = await _exchange(served.port, b"GET /fast HTTP/1.1\r\nHost: t\r\n")  # no blank line
    took = time.monotonic() - began
    status, _, body = _status_and_body(answer)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert 0.3 <= took < 1.5
    assert _shed("slow_head") == before + 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(served: AdmittingSite) -> None:
    began = time.monotonic()
    answer = await _exchange(served.port, b"")
    assert _status_and_body(answer)[0] == 408
    assert time.monotonic() - began < 1.5


async def test_past_the_connection_cap_a_new_connection_gets_503_with_retry_after(
    served: AdmittingSite,
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(SETTINGS.max_connections)]
    try:
        await asyncio.sleep(0.05)
        assert served.cap is not None and served.cap.open_connections == SETTINGS.max_connections
        before = _shed("connections")
        status, head, body = _status_and_body(await _exchange(served.port, _get("/fast")))
        assert status == 503
        assert b"Retry-After: 1" in head
        assert orjson.loads(body)["error"]["code"] == "unavailable"
        assert _shed("connections") == before + 1
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)
    assert _status_and_body(await _exchange(served.port, _get("/fast")))[0] == 200


async def test_past_the_cap_liveness_is_still_answered(served: AdmittingSite) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(SETTINGS.max_connections)]
    try:
        await asyncio.sleep(0.05)
        status, _, body = _status_and_body(await _exchange(served.port, _get("/healthz")))
        assert (status, orjson.loads(body)) == (200, {"status": "ok"})
        assert _status_and_body(await _exchange(served.port, _get("/readyz")))[0] == 503
    finally:
        for _, writer in held:
            writer.close()


async def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft, hard = admission.raise_open_file_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
    if hard != resource.RLIM_INFINITY:
        assert soft == hard


async def test_the_listen_backlog_is_the_setting() -> None:
    runner, site = await admission.start(_app(), replace(SETTINGS, listen_backlog=4000))
    try:
        # For a listening socket, ss shows the backlog as Send-Q.
        listing = (await asyncio.to_thread(
            subprocess.run, ["ss", "-Hltn", f"sport = :{site.port}"], capture_output=True, text=True, check=True
        )).stdout.split()
        assert listing[2] == "4000", listing
    finally:
        await runner.cleanup()


async def test_a_refused_connection_is_kept_answering_503_paced_then_closed(
    served: AdmittingSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "REFUSAL_LIFETIME_SECONDS", 1.0)
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(SETTINGS.max_connections)]
    try:
        await asyncio.sleep(0.05)
        before = _shed("connections")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        loop = asyncio.get_running_loop()
        began = loop.time()
        answers = []
        for _ in range(3):
            writer.write(_get("/fast", close=False))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append((head, await reader.readexactly(length)))
        took = loop.time() - began
        assert all(head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head for head, _ in answers)
        assert all(b"Connection: close" not in head for head, _ in answers)
        # Paced: each answer a queue budget after its request, so a refused client cannot spin.
        assert took >= 3 * SETTINGS.queue_budget_ms / 1000 * 0.9
        assert _shed("connections") == before + 3
        await asyncio.sleep(1.0)  # past the refusal's lifetime
        writer.write(_get("/fast", close=False))
        last = await asyncio.wait_for(reader.read(), 3)
        assert last.startswith(b"HTTP/1.1 503") and b"Connection: close" in last
        writer.close()
    finally:
        for _, held_writer in held:
            held_writer.close()
