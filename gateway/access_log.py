"""Logging that never carries a postback token (it may sit in a query string)."""

from __future__ import annotations

import logging
import re

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s'\"]*", re.IGNORECASE)

AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access lines with the path only, never the query string."""

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


def install_redaction() -> None:
    for name in AIOHTTP_LOGGERS:
        logging.getLogger(name).addFilter(RedactTokens())
