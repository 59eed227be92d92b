"""An in-process world for conversion tests: real fraud, real attribution replicas."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from services.attribution.server import AttributionService, start_attribution
from tests.support import Clock, attribution_settings, fraud_settings, free_port, ts

# The conversion tests take ts from here with the world that uses it.
__all__ = [
    "BROWSER_UA",
    "FraudHandle",
    "Replica",
    "World",
    "fraud_service",
    "start_fraud_service",
    "ts",
    "world",
    "world_without_fraud",
]

_order_ids = itertools.count(1)
BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


@dataclass
class Replica:
    service: AttributionService
    channel: grpc.aio.Channel
    catalog: attribution_pb2_grpc.CatalogServiceAsyncStub
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub


@dataclass
class World:
    database_url: str
    db: asyncpg.Connection
    clock: Clock
    fraud_addr: str
    replicas: list[Replica] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def catalog(self) -> attribution_pb2_grpc.CatalogServiceAsyncStub:
        return self.replicas[0].catalog

    @property
    def tracking(self) -> attribution_pb2_grpc.TrackingServiceAsyncStub:
        return self.replicas[0].tracking

    async def add_replica(self, **overrides: Any) -> Replica:
        settings = attribution_settings(self.database_url, self.fraud_addr, **overrides)
        service = await start_attribution(settings, clock=self.clock)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        replica = Replica(
            service, channel,
            attribution_pb2_grpc.CatalogServiceStub(channel),
            attribution_pb2_grpc.TrackingServiceStub(channel),
        )
        self.replicas.append(replica)
        return replica

    async def campaign(self, campaign_id: str = "cmp", **fields: Any) -> pb.Campaign:
        fields.setdefault("name", "Summer")
        fields.setdefault("landing_url", "https://shop.example/landing")
        fields.setdefault("currency", "EUR")
        fields.setdefault("payout_micros", 5_000_000)
        created = await self.catalog.CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(id=campaign_id, **fields)), timeout=10
        )
        self.tokens[created.id] = created.postback_token
        return created

    async def affiliate(self, affiliate_id: str, channel: str = "social", **fields: Any) -> pb.Affiliate:
        return await self.catalog.CreateAffiliate(
            pb.CreateAffiliateRequest(
                affiliate=pb.Affiliate(id=affiliate_id, name=affiliate_id, channel=channel, **fields)
            ),
            timeout=10,
        )

    async def coupon(self, code: str, campaign_id: str = "cmp", **fields: Any) -> pb.Coupon:
        return await self.catalog.CreateCoupon(
            pb.CreateCouponRequest(coupon=pb.Coupon(code=code, campaign_id=campaign_id, **fields)), timeout=10
        )

    async def get_coupon(self, code: str, campaign_id: str = "cmp") -> pb.Coupon:
        return await self.catalog.GetCoupon(pb.GetCouponRequest(campaign_id=campaign_id, code=code), timeout=10)

    async def click(self, affiliate_id: str, campaign_id: str = "cmp", **fields: Any) -> str:
        fields.setdefault("occurred_at", ts(self.clock.now - timedelta(hours=1)))
        fields.setdefault("user_agent", BROWSER_UA)
        response = await self.tracking.RecordClick(
            pb.RecordClickRequest(campaign_id=campaign_id, affiliate_id=affiliate_id, **fields), timeout=10
        )
        return response.click_id

    def request(self, campaign_id: str = "cmp", **fields: Any) -> pb.RecordConversionRequest:
        fields.setdefault("order_id", f"order-{next(_order_ids)}")
        fields.setdefault("amount_micros", 50_000_000)
        fields.setdefault("currency", "EUR")
        fields.setdefault("postback_token", self.tokens.get(campaign_id, ""))
        return pb.RecordConversionRequest(campaign_id=campaign_id, **fields)

    async def convert(self, replica: Replica | None = None, **fields: Any) -> pb.Conversion:
        stub = (replica or self.replicas[0]).tracking
        return await stub.RecordConversion(self.request(**fields), timeout=20)

    async def get(self, order_id: str, campaign_id: str = "cmp") -> pb.Conversion:
        return await self.tracking.GetConversion(
            pb.GetConversionRequest(campaign_id=campaign_id, order_id=order_id), timeout=10
        )

    async def refund(self, order_id: str, campaign_id: str = "cmp", **fields: Any) -> pb.Conversion:
        return await self.tracking.ReverseConversion(
            pb.ReverseConversionRequest(
                campaign_id=campaign_id, order_id=order_id,
                postback_token=self.tokens.get(campaign_id, ""), **fields,
            ),
            timeout=10,
        )

    async def live_ledger(self, code: str, campaign_id: str = "cmp") -> int:
        return int(await self.db.fetchval(
            "SELECT count(*) FROM redemptions WHERE campaign_id = $1 AND code = $2 AND released_at IS NULL",
            campaign_id, code,
        ))

    async def used(self, code: str, campaign_id: str = "cmp") -> int:
        return int(await self.db.fetchval(
            "SELECT used FROM coupons WHERE campaign_id = $1 AND code = $2", campaign_id, code
        ))

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.channel.close()
            await replica.service.stop(0.5)


@dataclass
class FraudHandle:
    addr: str
    service: Any
    settings: Any

    async def stop(self) -> None:
        await self.service.stop()


async def start_fraud_service(
    redis_url: str, redis_prefix: str, ipintel_dir: Path, port: int = 0
) -> FraudHandle:
    from services.fraud.server import start_fraud

    settings = fraud_settings(redis_url, redis_prefix, ipintel_dir, port)
    service = await start_fraud(settings, handle_sighup=False)
    return FraudHandle(f"127.0.0.1:{service.port}", service, settings)


@pytest.fixture
async def fraud_service(redis_server_url: str, redis_prefix: str, ipintel_dir: Path, redis_client: Any) -> AsyncIterator[FraudHandle]:
    handle = await start_fraud_service(redis_server_url, redis_prefix, ipintel_dir)
    yield handle
    await handle.stop()


@pytest.fixture
async def world(database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle) -> AsyncIterator[World]:
    w = World(database_url, db, Clock(datetime.now(UTC)), fraud_service.addr)
    await w.add_replica()
    yield w
    await w.close()


@pytest.fixture
async def world_without_fraud(database_url: str, db: asyncpg.Connection) -> AsyncIterator[World]:
    w = World(database_url, db, Clock(datetime.now(UTC)), f"127.0.0.1:{free_port()}")
    await w.add_replica(fraud_deadline_ms=50)
    yield w
    await w.close()
