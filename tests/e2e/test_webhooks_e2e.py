"""Webhooks end to end: the three services as real processes, a real receiver, kill -9 mid-delivery."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.e2e.world import LiveWorld, live_world
from tests.unit.test_webhook_rules import readme_receiver
from tests.webhook_receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def hooked(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
    redis_client: Any,
) -> AsyncIterator[LiveWorld]:
    env = {
        "ASCRIBE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "1",  # the receiver is on loopback
        "ASCRIBE_WEBHOOK_RETRY_SCHEDULE": "0.5,0.5,0.5",
    }
    async with live_world(database_url, redis_server_url, redis_prefix, ipintel_dir, tmp_path, env) as world:
        yield world


def in_a_minute() -> str:
    """An order time a minute after its click: an instant one is fraud_ctit_too_short."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))


def query(path_qs: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(path_qs).query, keep_blank_values=True).items()}


async def test_gateway_conversions_reach_the_affiliate_and_signed_events_verify(
    hooked: LiveWorld, receiver: Receiver
) -> None:
    campaign = await hooked.setup_campaign(hold_days=30)
    now = await hooked.setup_campaign(id="now", hold_days=0)
    await hooked.catalog.CreateAffiliate(pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff", name="A")),
                                         timeout=10)
    await hooked.catalog.CreateCoupon(pb.CreateCouponRequest(coupon=pb.Coupon(
        campaign_id="cmp", code="SUMMER", allow_all_affiliates=True)), timeout=10)
    template = (receiver.url + "/pb?cid={click_id}&aff={aff_click_id}&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}"
                "&s5={sub5}&o={order_id}&c={conversion_id}&a={amount}&p={payout}&cur={currency}&st={status}"
                "&cp={coupon}&e={event}")
    for campaign_id in ("cmp", "now"):
        await hooked.catalog.CreateWebhook(pb.CreateWebhookRequest(webhook=pb.Webhook(
            kind=pb.WEBHOOK_KIND_PARTNER_POSTBACK, campaign_id=campaign_id, affiliate_id="aff", url=template,
            events=["conversion.pending", "conversion.approved", "conversion.reversed"])), timeout=10)
    events = await hooked.catalog.CreateWebhook(pb.CreateWebhookRequest(webhook=pb.Webhook(
        kind=pb.WEBHOOK_KIND_EVENTS, campaign_id="cmp", url=receiver.url + "/events",
        events=["conversion.reversed"])), timeout=10)

    click = await hooked.click(campaign_id="cmp", aff_id="aff", aff_click_id="p-1", sub1="a b&c/ü", sub2="2",
                               sub3="3", sub4="4", sub5="5")
    click_id = click.headers["X-Ascribe-Click-Id"]
    status, body = await hooked.postback(campaign.postback_token, campaign_id="cmp", order_id="o 1/ü",
                                         amount="25.00", currency="EUR", click_id=click_id, coupon="SUMMER",
                                         occurred_at=in_a_minute())
    assert status == 200 and body["status"] == "pending", body["reasons"]
    committed_at = asyncio.get_running_loop().time()
    [first] = await receiver.wait_for(1, timeout=15)
    assert first.at - committed_at < 5.0  # the first attempt, at the default 1 s polling
    assert query(first.path_qs) == {
        "cid": click_id, "aff": "p-1", "s1": "a b&c/ü", "s2": "2", "s3": "3", "s4": "4", "s5": "5",
        "o": "o 1/ü", "c": body["id"], "a": "25.00", "p": "5.00", "cur": "EUR", "st": "pending", "cp": "SUMMER",
        "e": "conversion.pending",
    }
    assert "s1=a%20b%26c%2F%C3%BC&" in first.path_qs

    async with hooked.http.post(f"{hooked.url}/postback", params={
        "event": "refund", "campaign_id": "cmp", "order_id": "o 1/ü"}, headers={"X-Ascribe-Token": campaign.postback_token}
    ) as refund:
        assert refund.status == 200
    seen = await receiver.wait_for(3, timeout=15)
    reversed_postback = next(r for r in seen if r.path_qs.startswith("/pb") and r is not first)
    assert (query(reversed_postback.path_qs)["e"], query(reversed_postback.path_qs)["st"]) == (
        "conversion.reversed", "reversed")
    signed = next(r for r in seen if r.path_qs == "/events")
    verify = readme_receiver()["verify_ascribe_signature"]
    assert callable(verify)
    assert json.loads(signed.body)["type"] == "conversion.reversed"
    assert verify(events.secret, signed.headers["X-Ascribe-Signature"], signed.body)
    assert not verify(events.secret, signed.headers["X-Ascribe-Signature"], signed.body + b" ")

    click = await hooked.click(campaign_id="now", aff_id="aff")
    status, body = await hooked.postback(now.postback_token, campaign_id="now", order_id="z1", amount="10.00",
                                         currency="EUR", click_id=click.headers["X-Ascribe-Click-Id"],
                                         occurred_at=in_a_minute())
    assert status == 200 and body["status"] == "approved"
    await receiver.wait_for(4, timeout=15)
    await asyncio.sleep(1.0)
    zero_day = [query(r.path_qs)["e"] for r in receiver.received if "o=z1" in r.path_qs]
    assert zero_day == ["conversion.approved"]


async def test_kill_9_mid_delivery_loses_no_committed_event(
    hooked: LiveWorld, receiver: Receiver, database_url: str
) -> None:
    receiver.delay = 0.02  # slow enough that the kill lands mid-way
    campaign = await hooked.setup_campaign(hold_days=30)
    await hooked.catalog.CreateWebhook(pb.CreateWebhookRequest(webhook=pb.Webhook(
        kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/events", events=["conversion.pending"])), timeout=10)
    for start in range(0, 1000, 250):
        batch = pb.RecordConversionBatchRequest(requests=[
            pb.RecordConversionRequest(campaign_id="cmp", order_id=f"k-{n}", amount_micros=10_000_000,
                                       currency="EUR", postback_token=campaign.postback_token)
            for n in range(start, start + 250)
        ])
        response = await hooked.tracking.RecordConversionBatch(batch, timeout=60)
        assert len(response.responses) == 250
    await receiver.wait_for(100, timeout=30)
    await asyncio.to_thread(hooked.stack.kill_service, "attribution")
    delivered_before = len({r.headers["X-Ascribe-Delivery"] for r in receiver.received})
    assert delivered_before < 1000, "the kill came too late to prove anything"
    await asyncio.to_thread(hooked.stack.start_service, "attribution")

    conn = await asyncpg.connect(database_url)
    try:
        committed = await conn.fetchval("SELECT count(*) FROM conversions WHERE campaign_id = 'cmp'")
        assert committed == 1000
        for _ in range(600):
            distinct = {r.headers["X-Ascribe-Delivery"] for r in receiver.received}
            if len(distinct) >= committed:
                break
            await asyncio.sleep(0.1)
        distinct_events = {json.loads(r.body)["id"] for r in receiver.received}
        assert len(distinct) == committed == len(distinct_events)
        # The receiver answered; the replica records it just after. A delivery the
        # killed replica had sent but not recorded is sent again once its lease
        # (15 s) runs out: the receiver already counted its id, the row follows.
        for _ in range(300):
            delivered = await conn.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
            if delivered == committed:
                break
            await asyncio.sleep(0.1)
        assert delivered == committed
        # At least once: the kill may have cut answers the replica never recorded, sent again after it.
        assert len(receiver.received) >= committed
    finally:
        await conn.close()
