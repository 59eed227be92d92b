"""The shared `python -m services.<name>` entry point of our gRPC services."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import uvloop

from services.common.env import ConfigError
from services.common.gc_tuning import tune_gc_after_startup
from services.common.grpc_server import wait_for_stop_signal
from services.common.logs import setup_logging
from services.common.metrics import serve_metrics


class Stoppable(Protocol):
    async def stop(self) -> None: ...


class HasMetricsAddress(Protocol):
    @property
    def metrics_host(self) -> str: ...

    @property
    def metrics_port(self) -> int: ...


S = TypeVar("S", bound=HasMetricsAddress)


def run_service(name: str, load_settings: Callable[[], S], start: Callable[[S], Awaitable[Stoppable]]) -> None:
    """Settings from the environment (exit 2 when they are wrong), metrics, then serve until SIGTERM/SIGINT."""
    setup_logging(name)
    logger = logging.getLogger(f"services.{name}")
    try:
        settings = load_settings()
    except ConfigError as error:
        logger.error("configuration error: %s", error)
        sys.exit(2)
    serve_metrics(settings.metrics_host, settings.metrics_port)

    async def serve() -> None:
        service = await start(settings)
        tune_gc_after_startup()
        try:
            await wait_for_stop_signal()
        finally:
            await service.stop()

    uvloop.run(serve())
