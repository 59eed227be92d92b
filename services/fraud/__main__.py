"""python -m services.fraud: run the fraud service until SIGTERM/SIGINT (SIGHUP reloads the IP lists)."""

from __future__ import annotations

import logging
import sys

import uvloop

from services.common.env import ConfigError
from services.common.grpc_server import wait_for_stop_signal
from services.common.logs import setup_logging
from services.common.metrics import serve_metrics
from services.fraud.config import Settings
from services.fraud.server import start_fraud

logger = logging.getLogger("services.fraud")


async def serve(settings: Settings) -> None:
    service = await start_fraud(settings)
    try:
        await wait_for_stop_signal()
    finally:
        await service.stop()


def main() -> None:
    setup_logging("fraud")
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        logger.error("configuration error: %s", error)
        sys.exit(2)
    serve_metrics(settings.metrics_host, settings.metrics_port)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
