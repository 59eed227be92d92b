"""Requests aiohttp refuses before any handler runs, answered with the contract's JSON.

A malformed request line, oversized headers or bad chunked encoding never
reach the application: aiohttp's RequestHandler.handle_error answers them
itself, as text/plain that repeats the offending request (a reflected-input
hazard, and not the contract's error shape), and logs each one with a
traceback (anyone who can reach the port could flood the log). aiohttp has no
hook for this, so ``install`` replaces that one method, once per process: the
answer is ``{"error": {"code": "bad_request", ...}}`` with a fixed message,
the connection is closed as aiohttp does, and refusals are logged at most
once per interval with a count.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web, web_protocol

logger = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 10.0
_MESSAGES = {
    400: ("bad_request", "malformed HTTP request"),
    413: ("payload_too_large", "the request is too large"),
    414: ("uri_too_long", "the request line is too long"),
    431: ("headers_too_large", "the request headers are too large"),
}


class _Refusals:
    def __init__(self) -> None:
        self.count = 0
        self.last_report = -float("inf")

    def note(self, status: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last_report >= LOG_INTERVAL_SECONDS:
            logger.warning("%d malformed HTTP request(s) refused since the last report (latest: %d)",
                           self.count, status)
            self.count = 0
            self.last_report = now


_refusals = _Refusals()


def json_protocol_error(status: int) -> web.Response:
    """The answer to a request aiohttp could not parse (never echoing any of it)."""
    if status >= 500:
        code, message, status = "unavailable", "the gateway could not handle this request; try again", 503
    else:
        code, message = _MESSAGES.get(status, _MESSAGES[400])
    body = orjson.dumps({"error": {"code": code, "message": message, "field": None}})
    response = web.Response(body=body, status=status, content_type="application/json")
    response.force_close()
    return response


def _handle_error(
    self: web_protocol.RequestHandler,
    request: Any,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    if request.writer.output_size > 0:
        # As aiohttp does: part of an answer went out, the connection is broken.
        raise ConnectionError("response already started; cannot send an error")
    _refusals.note(status)
    return json_protocol_error(status)


def install() -> None:
    """Makes every aiohttp server of this process answer protocol errors with JSON."""
    web_protocol.RequestHandler.handle_error = _handle_error  # type: ignore[method-assign]
