"""Builds and runs the attribution service: pool, fraud channel, servicers, jobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import asyncpg
import grpc
from ascribe.attribution.v1 import attribution_pb2, attribution_pb2_grpc

from services.attribution.catalog.cache import CatalogCache
from services.attribution.catalog.servicer import CatalogServicer
from services.attribution.checkout.guard import GuessGuard
from services.attribution.checkout.validator import CheckoutValidator
from services.attribution.clicks import store as click_store
from services.attribution.clicks.recorder import ClickRecorder
from services.attribution.clicks.servicer import ClickRpcs
from services.attribution.common.database import DATABASE_UNAVAILABLE, Connection
from services.attribution.common.visitor import VisitorDerivation
from services.attribution.config import Settings
from services.attribution.conversions.recorder import ConversionRecorder
from services.attribution.conversions.servicer import ConversionRpcs
from services.attribution.experiments.assignment import ClickAssigner, ExperimentCache
from services.attribution.experiments.servicer import ExperimentServicer
from services.attribution.fraud_client import FraudClient
from services.attribution.lifecycle.changes import Lifecycle, follow_alerts, run_periodically
from services.attribution.metrics import POOLS
from services.attribution.migrate import migrate
from services.attribution.reports import compaction as report_compaction
from services.attribution.reports.servicer import ReportServicer
from services.attribution.schema_gate import SchemaGate
from services.attribution.tracking_servicer import TrackingServicer
from services.attribution.webhooks import delivery as webhook_delivery
from services.attribution.webhooks.servicer import WebhookRpcs
from services.common.channels import open_channel
from services.common.grpc_server import RunningServer, ServerInterceptor, start_server
from services.common.readiness import Probe, first_attempt, follow_dependency, postgres_probe
from services.common.timestamps import utcnow

logger = logging.getLogger(__name__)

_PACKAGE = attribution_pb2.DESCRIPTOR.package
CATALOG_SERVICE = f"{_PACKAGE}.CatalogService"
TRACKING_SERVICE = f"{_PACKAGE}.TrackingService"
REPORT_SERVICE = f"{_PACKAGE}.ReportService"
RECORDING_METHODS = (
    "RecordClick",
    "RecordClickBatch",
    "RecordClickStream",
    "RecordConversion",
    "RecordConversionBatch",
    "ReverseConversion",
)
ADMIN_TRACKING_METHODS = ("ReviewConversion", "GetConversion", "ListConversions", "GetClick")
# A shop's checkout has the campaign's postback token, not the admin token:
# ValidateCoupon checks either itself (checkout.validator).
SELF_AUTHORIZED_CATALOG_METHODS = ("ValidateCoupon", "ValidateCouponBatch")
# Experiments (issue #17): admin, except AssignVariant, which checks the
# campaign's postback token (or the admin token) itself.
EXPERIMENT_SERVICE = f"{_PACKAGE}.ExperimentService"
EXPERIMENT_SHOP_METHODS = ("AssignVariant",)


def required_tokens(settings: Settings) -> dict[str, str | None]:
    """Admin RPCs need the admin token; recording RPCs the internal token."""
    tokens: dict[str, str | None] = {}
    for service_name in (CATALOG_SERVICE, REPORT_SERVICE):
        service = attribution_pb2.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        for method in service.methods:
            tokens[f"/{service_name}/{method.name}"] = settings.admin_token
    for name in SELF_AUTHORIZED_CATALOG_METHODS:
        tokens[f"/{CATALOG_SERVICE}/{name}"] = None
    for name in ADMIN_TRACKING_METHODS:
        tokens[f"/{TRACKING_SERVICE}/{name}"] = settings.admin_token
    for name in RECORDING_METHODS:
        tokens[f"/{TRACKING_SERVICE}/{name}"] = settings.internal_token
    for method in attribution_pb2.DESCRIPTOR.services_by_name["ExperimentService"].methods:
        if method.name not in EXPERIMENT_SHOP_METHODS:
            tokens[f"/{EXPERIMENT_SERVICE}/{method.name}"] = settings.admin_token
    return tokens


async def _keep_session(conn: Connection) -> None:
    """What a connection going back to the pool needs: nothing beyond asyncpg's own rollback.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` on every release: one more round trip per
    transaction (a conversion batch, a catalog read). Our sessions carry no
    such state: advisory locks are transaction-scoped (the migration lock is
    released in a ``finally``), cursors live inside transactions, nothing
    listens, and settings are ``SET LOCAL`` or the connection's start-up
    parameters. An open transaction is still rolled back by asyncpg before
    this runs.
    """


@dataclass
class AttributionService:
    settings: Settings
    pool: asyncpg.Pool
    fraud_channel: grpc.aio.Channel
    server: RunningServer
    clicks: ClickRpcs
    fraud: FraudClient
    recorder: ConversionRecorder
    lifecycle: Lifecycle
    webhooks: webhook_delivery.WebhookWorker
    guard: GuessGuard
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    catalog: CatalogServicer | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_seconds: float = 4.0) -> None:
        self.clicks.stopping.set()  # click streams end after answering what they read
        await self.server.stop(grace_seconds)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.clicks.close()
        await self.recorder.close()
        await self.guard.close()
        await self.fraud.close()
        await self.fraud_channel.close()
        if self.catalog is not None:
            await self.catalog.close()
        await self.pool.close()


def _background_jobs(service: AttributionService, gate: SchemaGate) -> list[asyncio.Task[None]]:
    """Approval of due conversions, re-scoring, click partitions and the leak response."""
    settings, lifecycle = service.settings, service.lifecycle

    async def ensure_partitions() -> None:
        await click_store.ensure_click_partitions(service.pool, 1, 7)

    jobs = [
        run_periodically("approval", settings.approval_interval_ms / 1000, lifecycle.approve_all_due),
        run_periodically("rescore", settings.rescore_interval_ms / 1000, lifecycle.rescore),
        run_periodically("click partitions", 6 * 3600, ensure_partitions),
        # Reports: fold the rollups' deltas (one replica at a time).
        run_periodically("report compaction", settings.report_compact_interval_ms / 1000,
                         partial(report_compaction.compact_once, service.pool)),
    ]
    if settings.auto_hold_leaked_codes:
        jobs.append(follow_alerts(lifecycle, service.pool, service.fraud_channel, settings.internal_token))
    # Webhooks (issue #18): every replica delivers; alerts become outbox events.
    jobs.append(service.webhooks.run())
    jobs.append(webhook_delivery.follow_alerts(service.pool, service.fraud_channel, settings.internal_token))
    # Not before the deferred start-up migrations have run (services/attribution/schema_gate.py).
    return [asyncio.create_task(gate.after_opening(job)) for job in jobs]


async def start_attribution(settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> AttributionService:
    """Starts the service; ``clock`` is injectable so tests need not sleep."""
    def open_pool(min_size: int) -> asyncpg.Pool:
        return asyncpg.create_pool(
            settings.database_url,
            min_size=min_size,
            max_size=settings.db_pool_max,
            # asyncpg's default, 60 s, would hold start-up that long on a stopped server.
            timeout=5,
            reset=_keep_session,
            command_timeout=settings.db_statement_timeout_ms / 1000,
            # Start-up parameters: they hold for the whole session, whatever a reset does.
            server_settings={"statement_timeout": str(settings.db_statement_timeout_ms), "TimeZone": "UTC"},
        )

    async def prepare_database() -> None:
        async with pool.acquire(timeout=5) as conn:
            await migrate(conn)
            await click_store.ensure_click_partitions(conn, 1, 7)

    try:
        pool = await open_pool(settings.db_pool_min)
    except DATABASE_UNAVAILABLE as error:
        # (Re)started while PostgreSQL is down: come up live but not ready,
        # connect on demand and migrate once it answers (readiness retries
        # ``pending``), rather than exit and be restarted in a loop.
        logger.warning("PostgreSQL is unavailable at start-up (%r); not ready until it answers", error)
        pool = await open_pool(0)
        pending: Probe | None = prepare_database
    else:
        pending = await first_attempt(prepare_database, DATABASE_UNAVAILABLE, "PostgreSQL")
    POOLS.watch(pool)
    # Every service of the proto package, whichever capability added it.
    gate = SchemaGate(pending, [service.full_name for service in attribution_pb2.DESCRIPTOR.services_by_name.values()])
    pending = gate.deferred_step()
    fraud_channel = open_channel(settings.fraud_addr, settings.transport)
    fraud = FraudClient(
        fraud_channel, settings.fraud_deadline_ms, settings.internal_token, click_stream=settings.fraud_click_stream
    )
    cache = CatalogCache(pool, ttl_seconds=settings.catalog_cache_ms / 1000)
    visitors = VisitorDerivation(settings.geoip_db)
    logger.info("visitor countries from %s", visitors.source)
    experiment_cache = ExperimentCache(pool, ttl_seconds=settings.catalog_cache_ms / 1000)
    clicks = ClickRpcs(
        ClickRecorder(pool, cache, fraud, visitors=visitors, experiments=ClickAssigner(pool, experiment_cache))
    )
    guard = GuessGuard(fraud)
    recorder = ConversionRecorder(pool, cache, fraud, clock=clock, visitors=visitors, guard=guard)
    lifecycle = Lifecycle(pool, cache, fraud, clock=clock, rescore_per_second=settings.rescore_per_second)
    webhook_worker = webhook_delivery.WebhookWorker(pool, settings.webhooks)
    catalog = CatalogServicer(
        pool,
        WebhookRpcs(pool, settings.webhooks, wake=webhook_worker.wake.set),
        CheckoutValidator(pool, cache, guard, admin_token=settings.admin_token, visitors=visitors, clock=clock),
    )
    tracking = TrackingServicer(clicks, ConversionRpcs(pool, recorder, lifecycle))
    experiments = ExperimentServicer(pool, experiment_cache, cache, admin_token=settings.admin_token, clock=clock)
    report = ReportServicer(pool, clock=clock)

    def register(server: grpc.aio.Server) -> None:
        attribution_pb2_grpc.add_CatalogServiceServicer_to_server(catalog, server)
        attribution_pb2_grpc.add_TrackingServiceServicer_to_server(tracking, server)
        attribution_pb2_grpc.add_ReportServiceServicer_to_server(report, server)
        attribution_pb2_grpc.add_ExperimentServiceServicer_to_server(experiments, server)

    running = await start_server(
        name="attribution",
        addr=settings.addr,
        service_names=[CATALOG_SERVICE, TRACKING_SERVICE, REPORT_SERVICE, EXPERIMENT_SERVICE],
        register=register,
        interceptor=ServerInterceptor(
            required_tokens(settings), unavailable_errors=DATABASE_UNAVAILABLE, gate=gate.refusal
        ),
        transport=settings.transport,
        health_addr=settings.health_addr,
    )
    service = AttributionService(
        settings=settings, pool=pool, fraud_channel=fraud_channel, server=running, clicks=clicks,
        fraud=fraud, recorder=recorder, lifecycle=lifecycle, webhooks=webhook_worker, guard=guard,
        catalog=catalog,
    )
    if settings.background_jobs:
        service.tasks = _background_jobs(service, gate)
    # A pooled connection may still answer a stopped postmaster: the probe connects afresh.
    service.tasks.append(await follow_dependency(
        running.health, [CATALOG_SERVICE, TRACKING_SERVICE, REPORT_SERVICE, EXPERIMENT_SERVICE],
        postgres_probe(settings.database_url), "PostgreSQL", prepare=pending,
    ))
    return service
