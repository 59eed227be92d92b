"""gRPC health follows the real dependency, liveness only the process.

The services run in-process against their own embedded PostgreSQL and Redis,
which the tests start late, stop and pause: a service started while its
database is down is live (not ready), and becomes ready once it answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attribution.server import TRACKING_SERVICE, start_attribution
from services.common import embedded
from services.common.readiness import LIVENESS_SERVICE, PROBE_TIMEOUT, postgres_probe
from services.fraud.config import Settings as FraudSettings
from services.fraud.server import FRAUD_SERVICE, start_fraud
from services.fraud.store import StoreConfig
from tests.support import attribution_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The contract's bound: readiness follows the dependency within 2 s either way.
WITHIN = 2.0


async def _status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return int(reply.status)


async def _until(condition: Callable[[], object], timeout: float) -> float:
    """Seconds until the awaitable made by ``condition()`` is true; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await condition():  # type: ignore[misc]
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


async def test_attribution_started_without_its_database_is_live_then_ready_then_follows_it(tmp_path: Path) -> None:
    port = embedded.free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    service = await start_attribution(attribution_settings(url, "127.0.0.1:9", db_pool_min=1, db_pool_max=4))
    server: embedded.EmbeddedServer | None = None
    try:
        assert await _status(service.port, "") == NOT_SERVING
        assert await _status(service.port, TRACKING_SERVICE) == NOT_SERVING
        assert await _status(service.port, LIVENESS_SERVICE) == SERVING

        server = await asyncio.to_thread(embedded.start_postgres, tmp_path / "pg", port)
        answered = time.monotonic()
        await _until(lambda: _is(service.port, TRACKING_SERVICE, SERVING), WITHIN + 3)
        ready_after = time.monotonic() - answered
        assert ready_after <= WITHIN, ready_after
        # Ready means prepared: the start-up migrations ran once it answered.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            created = await attribution_pb2_grpc.CatalogServiceStub(channel).CreateCampaign(
                pb.CreateCampaignRequest(campaign=pb.Campaign(
                    name="Late", landing_url="https://shop.example/", currency="EUR", payout_micros=1,
                )),
                timeout=10,
            )
        assert created.id

        # Refusing connections: a stopped server (SIGINT, PostgreSQL's fast shutdown,
        # which does not wait for the pool's connections to leave).
        server.process.send_signal(signal.SIGINT)
        await asyncio.to_thread(server.stop)
        refused_after = await _until(lambda: _is(service.port, "", NOT_SERVING), WITHIN + 3)
        assert refused_after <= WITHIN, refused_after
        assert await _status(service.port, LIVENESS_SERVICE) == SERVING
    finally:
        await service.stop(0.5)
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _is(port: int, service: str, status: int) -> bool:
    return await _status(port, service) == status


async def test_a_paused_postmaster_fails_the_probe_within_its_timeout(tmp_path: Path) -> None:
    """Connections already open may still answer a stopped postmaster; a fresh one cannot."""
    server = await asyncio.to_thread(embedded.start_postgres, tmp_path / "pg")
    probe = postgres_probe(server.url)
    await probe()
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        try:
            await probe()
            raise AssertionError("the probe passed with the postmaster stopped")
        except TimeoutError:
            pass
        assert time.monotonic() - started < PROBE_TIMEOUT + 0.5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        await asyncio.to_thread(server.stop)


async def test_fraud_is_not_serving_while_its_redis_is_down_or_paused(tmp_path: Path, ipintel_dir: Path) -> None:
    port = embedded.free_port()
    settings = FraudSettings(
        redis_url=f"redis://127.0.0.1:{port}/0", addr="127.0.0.1:0", metrics_port=0, ipintel_dir=ipintel_dir,
        redis_timeout_ms=200, store=StoreConfig(prefix="ready"),
    )
    service = await start_fraud(settings, handle_sighup=False)
    redis_server: embedded.EmbeddedServer | None = None
    try:
        assert await _status(service.port, "") == NOT_SERVING
        assert await _status(service.port, FRAUD_SERVICE) == NOT_SERVING
        assert await _status(service.port, LIVENESS_SERVICE) == SERVING

        redis_server = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis", port)
        up = await _until(lambda: _is(service.port, FRAUD_SERVICE, SERVING), WITHIN + 3)
        assert up <= WITHIN, up

        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            paused = await _until(lambda: _is(service.port, "", NOT_SERVING), WITHIN + 3)
            assert paused <= WITHIN, paused
            assert await _status(service.port, LIVENESS_SERVICE) == SERVING
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        resumed = await _until(lambda: _is(service.port, "", SERVING), WITHIN + 3)
        assert resumed <= WITHIN, resumed
    finally:
        await service.stop(0.5)
        if redis_server is not None:
            await asyncio.to_thread(redis_server.stop)
