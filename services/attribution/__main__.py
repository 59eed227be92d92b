"""python -m services.attribution: run the attribution service until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys

import uvloop

from services.attribution.config import Settings
from services.attribution.server import start_attribution
from services.common.env import ConfigError
from services.common.grpc_server import wait_for_stop_signal
from services.common.logs import setup_logging
from services.common.metrics import serve_metrics

logger = logging.getLogger("services.attribution")


async def serve(settings: Settings) -> None:
    service = await start_attribution(settings)
    try:
        await wait_for_stop_signal()
    finally:
        await service.stop()


def main() -> None:
    setup_logging("attribution")
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        logger.error("configuration error: %s", error)
        sys.exit(2)
    serve_metrics(settings.metrics_host, settings.metrics_port)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
