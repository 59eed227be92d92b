"""401 or 503: the gateway tells a shop's wrong postback token from its own refused internal token.

It decides by the status's ErrorInfo (services/common/status_details.py),
not by the message's text: our refused ASCRIBE_INTERNAL_TOKEN is a gateway
misconfiguration (503, the shop should retry), a wrong postback token is the
caller's fault (401).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from gateway.app import create_app
from gateway.config import Settings as GatewaySettings
from services.attribution.server import AttributionService, start_attribution
from services.common.grpc_server import bearer_metadata
from services.common.status_details import TOKEN_REFUSED, error_reason
from tests.support import attribution_settings, free_port

INTERNAL = "internal-t0ken"


@pytest.fixture
async def attribution(database_url: str) -> AsyncIterator[AttributionService]:
    settings = attribution_settings(
        database_url, f"127.0.0.1:{free_port()}", internal_token=INTERNAL, fraud_deadline_ms=50
    )
    service = await start_attribution(settings)
    try:
        yield service
    finally:
        await service.stop(0.5)


@pytest.fixture
async def campaign(attribution: AttributionService) -> pb.Campaign:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{attribution.port}") as channel:
        created: pb.Campaign = await attribution_pb2_grpc.CatalogServiceStub(channel).CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(
                name="Summer", landing_url="https://shop.example/", currency="EUR", payout_micros=1_000_000,
            )),
            timeout=10,
        )
        return created


async def _gateway(attribution: AttributionService, token: str, **overrides: Any) -> TestClient[Any, Any]:
    settings = GatewaySettings(
        attribution_addr=f"127.0.0.1:{attribution.port}", fraud_addr=f"127.0.0.1:{free_port()}",
        internal_token=token, deadline_ms=5000, **overrides,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.mark.parametrize("batch_conversions", [True, False])
async def test_our_refused_token_is_503_and_a_shops_wrong_token_401(
    attribution: AttributionService, campaign: pb.Campaign, batch_conversions: bool
) -> None:
    postback = f"/postback?campaign_id={campaign.id}&order_id=o-1&amount=1.00&currency=EUR"
    misconfigured = await _gateway(attribution, "not-the-token", batch_conversions=batch_conversions)
    configured = await _gateway(attribution, INTERNAL, batch_conversions=batch_conversions)
    try:
        refused = await misconfigured.get(f"{postback}&token={campaign.postback_token}")
        assert refused.status == 503, await refused.text()
        assert (await refused.json())["error"]["code"] == "unavailable"
        refund = await misconfigured.post(
            f"/postback?event=refund&campaign_id={campaign.id}&order_id=o-1&token={campaign.postback_token}"
        )
        assert refund.status == 503
        wrong = await configured.get(f"{postback}&token=wrong")
        assert wrong.status == 401, await wrong.text()
        assert (await wrong.json())["error"]["code"] == "unauthenticated"
        accepted = await configured.get(f"{postback}&token={campaign.postback_token}")
        assert accepted.status == 200, await accepted.text()
    finally:
        await misconfigured.close()
        await configured.close()


async def test_the_refusal_carries_its_reason(attribution: AttributionService, campaign: pb.Campaign) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{attribution.port}") as channel:
        tracking = attribution_pb2_grpc.TrackingServiceStub(channel)
        request = pb.RecordConversionRequest(
            campaign_id=campaign.id, order_id="o-2", amount_micros=1, currency="EUR", postback_token="wrong"
        )
        with pytest.raises(grpc.aio.AioRpcError) as ours:
            await tracking.RecordConversion(request, timeout=5, metadata=bearer_metadata("nope"))
        assert ours.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(ours.value) == TOKEN_REFUSED
        with pytest.raises(grpc.aio.AioRpcError) as shops:
            await tracking.RecordConversion(request, timeout=5, metadata=bearer_metadata(INTERNAL))
        assert shops.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(shops.value) is None
