"""``python -m gateway``: the HTTP gateway on uvloop, stopped gracefully by SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys

import uvloop
from aiohttp import web

from gateway import admission
from gateway.access_log import PathOnlyAccessLogger, install_redaction
from gateway.app import create_app
from gateway.config import Settings
from gateway.metrics import metrics_listener
from services.common.env import ConfigError
from services.common.gc_tuning import tune_gc_after_startup
from services.common.logs import setup_logging

logger = logging.getLogger("gateway")


def main() -> None:
    setup_logging("gateway")
    install_redaction()
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        logger.error("configuration error: %s", error)
        sys.exit(2)
    app = create_app(settings)

    async def after_startup(_: web.Application) -> None:
        tune_gc_after_startup()

    app.on_startup.append(after_startup)
    if settings.metrics_port:
        app.cleanup_ctx.append(metrics_listener(settings.metrics_host, settings.metrics_port))
    logger.info(
        "gateway serving on http://%s:%d (attribution at %s)",
        settings.host,
        settings.port,
        settings.attribution_addr,
    )
    # web.run_app, plus the connection cap, head timeout and backlog of admission control.
    admission.run(
        app,
        settings,
        uvloop.new_event_loop(),
        # Access lines cost CPU on every click; they are opt-in.
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        access_log_class=PathOnlyAccessLogger,
    )
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
