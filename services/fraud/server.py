"""Builds and runs the fraud service: Redis clients, lists, engine, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common.errors import Unavailable
from services.common.grpc_server import RunningServer, ServerInterceptor, start_server
from services.common.readiness import follow_dependency, redis_probe
from services.fraud import metrics, redis_memory
from services.fraud.bots import shared_bot_detector
from services.fraud.config import Settings
from services.fraud.engine import FraudEngine
from services.fraud.ipintel import IpIntel, IpIntelHolder, IpList
from services.fraud.ipintel_download import RefreshReport, refresh
from services.fraud.servicer import FraudServicer
from services.fraud.store import Alert, FraudStore, RedisClient

logger = logging.getLogger(__name__)

FRAUD_SERVICE = f"{fraud_pb2.DESCRIPTOR.package}.FraudService"


def required_tokens(settings: Settings) -> dict[str, str | None]:
    """Every FraudService RPC needs the internal token (when one is set)."""
    service = fraud_pb2.DESCRIPTOR.services_by_name["FraudService"]
    return {f"/{FRAUD_SERVICE}/{method.name}": settings.internal_token for method in service.methods}


def allowed_clients(settings: Settings) -> dict[str, frozenset[str]]:
    """Under mutual TLS with ASCRIBE_FRAUD_ALLOWED_CLIENTS, only those identities call FraudService.

    Health and reflection stay open to any client the TLS handshake accepts
    (the gateway's readiness probe asks fraud's health with its own certificate).
    """
    if not settings.allowed_clients:
        return {}
    return {method: settings.allowed_clients for method in required_tokens(settings)}


def redis_client(settings: Settings, *, extra_timeout_ms: int = 0) -> RedisClient:
    """A client whose every call is bounded: a hung Redis costs a timeout, a dead one fails at once.

    One retry without backoff lets a pooled connection that died with a
    restarted Redis be replaced transparently, which is how the service
    recovers by itself.
    """
    bounds: dict[str, Any] = {
        "socket_timeout": (settings.redis_timeout_ms + extra_timeout_ms) / 1000,
        "socket_connect_timeout": settings.redis_timeout_ms / 1000,
        "max_connections": settings.redis_max_connections,
        "health_check_interval": 30,
    }
    if settings.redis_cluster:
        # The URL names one node; the client learns the slot map from it and
        # follows MOVED/ASK when the cluster reshards or fails over. No
        # retries of its own: on a failure the cluster client closes every
        # connection and sleeps before retrying, which would stall the other
        # checks in flight; a failed check answers UNAVAILABLE instead and the
        # next one finds the new slot map.
        return aioredis.RedisCluster.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **bounds)
    return aioredis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 1), **bounds)


# Per list download, in the service: a refresh runs in a thread that a stop
# cannot interrupt mid-download, so it must not hold the process long.
REFRESH_TIMEOUT_SECONDS = 10.0


def _publish_intel_metrics(intel: IpIntel) -> None:
    for kind in IpList:
        metrics.IPINTEL_ENTRIES.labels(kind.value).set(intel.counts.get(kind, 0))
        # Computed at scrape time: the age grows between reloads.
        metrics.IPINTEL_AGE_SECONDS.labels(kind.value).set_function(functools.partial(intel.age_seconds, kind))


@dataclass
class FraudService:
    settings: Settings
    server: RunningServer
    engine: FraudEngine
    servicer: FraudServicer
    redis: RedisClient
    watch_redis: RedisClient
    intel: IpIntelHolder
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sighup_installed: bool = False
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return self.server.port

    def reload_in_background(self) -> None:
        """SIGHUP: reload the IP lists; the task leaves ``tasks`` when it is done."""
        task = asyncio.get_running_loop().create_task(self.reload_ipintel())
        self.tasks.append(task)
        task.add_done_callback(self.tasks.remove)

    async def reload_ipintel(self) -> None:
        intel = await asyncio.to_thread(self.intel.reload)
        metrics.IPINTEL_RELOADS_TOTAL.inc()
        _publish_intel_metrics(intel)

    async def refresh_ipintel(self) -> RefreshReport:
        """Downloads the lists (where `make ipintel` would) and reloads them when any was written."""
        folder = self.intel.refresh_folder
        report = await asyncio.to_thread(
            refresh, folder, self.settings.ipintel_sources, REFRESH_TIMEOUT_SECONDS, self._stopping
        )
        for name, error in report.failed:
            logger.warning("IP list refresh: %s failed (%s); the previous copy is kept", name, error)
        metrics.IPINTEL_REFRESHES_TOTAL.labels("failed" if report.failed else "ok").inc()
        if report.written:
            logger.info("IP list refresh: %d list(s) downloaded into %s", len(report.written), folder)
            await self.reload_ipintel()
        return report

    async def refresh_ipintel_forever(self, interval: float) -> None:
        """Every ``interval``; the first one at once when the loaded lists are already that old."""
        oldest = max(self.intel.current.age_seconds(kind) for kind in IpList)
        delay = max(0.0, interval - oldest)
        while True:
            await asyncio.sleep(delay)
            # A failed refresh waits a whole interval too: no retry storm on upstream servers.
            delay = interval
            try:
                await self.refresh_ipintel()
            except OSError as error:  # the folder cannot be written (a read-only image)
                logger.warning("IP list refresh into %s failed: %s", self.intel.refresh_folder, error)
                metrics.IPINTEL_REFRESHES_TOTAL.labels("failed").inc()

    async def stop(self, grace_seconds: float = 4.0) -> None:
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.servicer.stopping.set()
        self._stopping.set()
        await self.server.stop(grace_seconds)
        await self.engine.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.engine.flush_signal_counts()
        await self.engine.store.aclose()
        await self.redis.aclose()
        await self.watch_redis.aclose()


async def start_fraud(
    settings: Settings, *, handle_sighup: bool = True, intel: IpIntelHolder | None = None
) -> FraudService:
    """Starts the service; a Redis that is down at start-up is tolerated (checks answer UNAVAILABLE).

    ``intel`` lets tests share one loaded copy of the lists between services.
    """
    if intel is None:
        intel = await asyncio.to_thread(
            functools.partial(IpIntelHolder, settings.ipintel_dir, downloaded=settings.ipintel_download_dir)
        )
    _publish_intel_metrics(intel.current)
    bots = await asyncio.to_thread(shared_bot_detector)
    client = redis_client(settings)
    # WatchAlerts blocks on XREAD for up to watch_block_ms: its socket
    # timeout must outlast the block, and it must not hold a checking
    # connection while it waits.
    watch_client = redis_client(settings, extra_timeout_ms=settings.watch_block_ms)
    store = FraudStore(client, settings.store)
    # Replicas must agree on these (they name the hashes a check looks in):
    # logged so that a rolling change of the settings can be seen.
    logger.info(
        "fraud counters: %d key buckets, %d address shards and %d visitor shards per bucket",
        settings.store.key_buckets, store.ip_clicks.shards, store.first_visit.shards,
    )
    try:
        await store.load_scripts()
    except Unavailable:
        logger.error("Redis at start-up is unavailable; checks answer UNAVAILABLE until it is back")
    engine = FraudEngine(settings.rules, store, intel, bots, check_linger_ms=settings.check_linger_ms)

    async def read_alerts(after_id: str, block_ms: int) -> list[Alert]:
        return await store.read_alerts(after_id, block_ms, client=watch_client)

    async def watch_start() -> str:
        return await store.last_alert_id(client=watch_client)

    servicer = FraudServicer(
        engine,
        max_batch=settings.max_batch,
        max_future_seconds=settings.max_future_seconds,
        watch_block_ms=settings.watch_block_ms,
        watch_reader=read_alerts,
        watch_start=watch_start,
    )

    def register(server: grpc.aio.Server) -> None:
        fraud_pb2_grpc.add_FraudServiceServicer_to_server(servicer, server)

    running = await start_server(
        name="fraud",
        addr=settings.addr,
        service_names=[FRAUD_SERVICE],
        register=register,
        interceptor=ServerInterceptor(required_tokens(settings), peer_identities=allowed_clients(settings)),
        transport=settings.transport,
        health_addr=settings.health_addr,
    )
    service = FraudService(
        settings=settings,
        server=running,
        engine=engine,
        servicer=servicer,
        redis=client,
        watch_redis=watch_client,
        intel=intel,
    )
    service.tasks.append(asyncio.create_task(engine.run_surge_monitor(settings.surge_flush_seconds)))
    service.tasks.append(asyncio.create_task(redis_memory.watch(client)))
    # Checks answer UNAVAILABLE while Redis is unusable (or still LOADING): health says so.
    service.tasks.append(await follow_dependency(
        running.health, [FRAUD_SERVICE], redis_probe(settings.redis_url, cluster=settings.redis_cluster), "Redis",
    ))
    if handle_sighup:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_in_background)
            service._sighup_installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            logger.warning("SIGHUP reload of the IP lists is not available here")
    if settings.ipintel_refresh_seconds > 0:
        service.tasks.append(asyncio.create_task(service.refresh_ipintel_forever(settings.ipintel_refresh_seconds)))
    return service
