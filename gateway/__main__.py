"""``python -m gateway``: the HTTP gateway on uvloop, stopped gracefully by SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import re
import sys

import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.app import create_app
from gateway.config import Settings
from services.common.env import ConfigError
from services.common.logs import setup_logging

logger = logging.getLogger("gateway")

_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s'\"]*", re.IGNORECASE)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access lines without the query string: a postback's query may carry its token."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
            extra={"status": response.status, "path": request.path},
        )


class RedactTokens(logging.Filter):
    """aiohttp logs a malformed request with its raw request line; cut the token out."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # A client's garbage, not our bug: one line, no traceback, no raw bytes.
            record.msg = "rejected a malformed HTTP request: %s"
            record.args = (type(error).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        elif isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = _TOKEN_IN_TEXT.sub(r"\1<redacted>", record.msg)
        return True


def main() -> None:
    setup_logging("gateway")
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal"):
        logging.getLogger(name).addFilter(RedactTokens())
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        logger.error("configuration error: %s", error)
        sys.exit(2)
    app = create_app(settings)
    logger.info(
        "gateway serving on http://%s:%d (attribution at %s)",
        settings.host,
        settings.port,
        settings.attribution_addr,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # Access lines cost CPU on every click; they are opt-in.
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        access_log_class=PathOnlyAccessLogger,
        shutdown_timeout=settings.shutdown_grace_seconds,
        print=None,
        loop=uvloop.new_event_loop(),
    )
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
