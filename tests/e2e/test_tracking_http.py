"""Tracking links and postbacks end to end: gateway -> attribution -> fraud, real processes."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.e2e.world import LiveWorld

pytestmark = pytest.mark.slow


async def seed(live: LiveWorld) -> pb.Campaign:
    campaign = await live.setup_campaign()
    for affiliate in ("aff-a", "aff-b"):
        await live.catalog.CreateAffiliate(
            pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id=affiliate, name=affiliate, channel="social")),
            timeout=10,
        )
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(
            campaign_id="cmp", code="SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
        )),
        timeout=10,
    )
    return campaign


async def test_the_seed_flow_from_link_to_postback(live: LiveWorld) -> None:
    campaign = await seed(live)
    a = await live.click(campaign_id="cmp", aff_id="aff-a", coupon="summer150", sub1="story")
    assert a.status == 302
    location = urlsplit(a.headers["Location"])
    query = parse_qs(location.query)
    assert location.netloc == "shop.example" and query["utm_source"] == ["aff"]
    assert query["click_id"] == [a.headers["X-Ascribe-Click-Id"]] and query["coupon"] == ["SUMMER150"]
    a_click = await live.get_click(a.headers["X-Ascribe-Click-Id"])
    assert a_click.coupon_code == "SUMMER150" and a_click.decision == pb.CLICK_DECISION_ACCEPTED
    assert a_click.ip == "203.0.113.7" and a_click.sub1 == "story"

    b = await live.click(campaign_id="cmp", aff_id="aff-b", coupon="SUMMER150")
    assert b.status == 302 and b.headers["X-Ascribe-Decision"] == "accepted"
    b_click = await live.get_click(b.headers["X-Ascribe-Click-Id"])
    assert b_click.coupon_code == "" and "affiliate_not_allowed" in b_click.reasons

    # The order happened a minute after the click (a sale seconds after its
    # click is the fraud rule fraud_ctit_too_short).
    order = {
        "campaign_id": "cmp", "order_id": "1001", "amount": "49.90", "discount": "5.00", "currency": "EUR",
        "coupon": "SUMMER150", "click_id": a.headers["X-Ascribe-Click-Id"], "customer_id": "cust-1",
        "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
    }
    status, body = await live.postback(campaign.postback_token, **order)
    assert status == 200, body
    assert body["status"] == "pending", body
    assert body["affiliate_id"] == "aff-a" and body["source"] == "click"
    assert body["amount"] == "49.90" and body["payout"] == "5.00" and body["coupon_remaining"] == 149
    again_status, again = await live.postback(campaign.postback_token, **order)
    assert again_status == 200 and again["id"] == body["id"] and again["coupon_remaining"] == 149
    conflict_status, conflict = await live.postback(campaign.postback_token, **{**order, "amount": "59.90"})
    assert conflict_status == 409, conflict


async def test_crawlers_and_duplicate_affiliate_click_ids_are_rejected_but_redirected(live: LiveWorld) -> None:
    await seed(live)
    bot = await live.click(
        ua="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        campaign_id="cmp", aff_id="aff-a",
    )
    assert bot.status == 302 and bot.headers["X-Ascribe-Decision"] == "rejected"
    first = await live.click(campaign_id="cmp", aff_id="aff-a", aff_click_id="net-42", visitor_ip="203.0.113.8")
    dup = await live.click(campaign_id="cmp", aff_id="aff-a", aff_click_id="net-42", visitor_ip="203.0.113.9")
    assert first.headers["X-Ascribe-Decision"] == "accepted"
    assert dup.status == 302 and dup.headers["X-Ascribe-Decision"] == "rejected"
    assert "fraud_duplicate_click_id" in (await live.get_click(dup.headers["X-Ascribe-Click-Id"])).reasons


BAD_CLICKS = [
    ("aff_id=aff-a", 400, "campaign_id"),
    ("campaign_id=cmp", 400, "aff_id"),
    ("campaign_id=cmp&aff_id=aff-a&sub1=" + "x" * 257, 400, "sub1"),
    ("campaign_id=cmp&aff_id=aff-a&sub2=%ff%fe", 400, "sub2"),
    ("campaign_id=nope&aff_id=aff-a", 404, None),
]


async def test_bad_click_input(live: LiveWorld) -> None:
    await seed(live)
    for query, status, field in BAD_CLICKS:
        async with live.http.get(f"{live.url}/click?{query}", allow_redirects=False) as response:
            assert response.status == status, query
            body = await response.json()
        assert body["error"]["field"] == field, query
    huge_ua = "Mozilla/5.0 " + "x" * 1100
    async with live.http.get(f"{live.url}/click?campaign_id=cmp&aff_id=aff-a", allow_redirects=False,
                             headers={"User-Agent": huge_ua}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "user_agent"


async def test_fraud_service_stopped_mid_test_flags_and_loses_nothing(
    live: LiveWorld, database_url: str
) -> None:
    campaign = await seed(live)
    await asyncio.to_thread(live.stack.stop_service, "fraud")
    responses = await asyncio.gather(*(
        live.click(campaign_id="cmp", aff_id="aff-a", visitor_ip=f"203.0.113.{i}") for i in range(1, 41)
    ))
    assert all(r.status == 302 and r.headers["X-Ascribe-Decision"] == "flagged" for r in responses)
    status, body = await live.postback(
        campaign.postback_token, campaign_id="cmp", order_id="down-1", amount="10.00", currency="EUR",
    )
    assert status == 200 and body["status"] == "flagged" and "fraud_unavailable" in body["reasons"]
    conn = await asyncpg.connect(database_url)
    try:
        ids = [r.headers["X-Ascribe-Click-Id"] for r in responses]
        stored = await conn.fetchval("SELECT count(*) FROM clicks WHERE click_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    assert stored == 40


async def test_every_redirected_click_survives_a_kill_9(live: LiveWorld, database_url: str) -> None:
    await seed(live)
    redirected: list[str] = []
    failures = 0

    async def visitor(n: int) -> None:
        nonlocal failures
        for i in range(400):
            try:
                response = await live.click(campaign_id="cmp", aff_id="aff-a", visitor_ip=f"198.51.100.{n}",
                                            sub1=str(i))
            except aiohttp.ClientError:
                failures += 1
                await asyncio.sleep(0.01)
                continue
            if response.status == 302:
                redirected.append(response.headers["X-Ascribe-Click-Id"])
            else:
                failures += 1

    async def killer() -> None:
        await asyncio.sleep(0.7)
        await asyncio.to_thread(live.stack.kill_service, "attribution", signal.SIGKILL)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(live.stack.start_service, "attribution")

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(killer(), *(visitor(n) for n in range(1, 9))), timeout=120)
    assert time.monotonic() - started < 120
    assert failures > 0, "the kill should have failed some requests"
    assert len(redirected) > 100
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM clicks WHERE click_id = ANY($1::text[])", redirected
        )
    finally:
        await conn.close()
    assert stored == len(redirected)


async def test_postbacks_race_through_the_gateway(live: LiveWorld) -> None:
    campaign = await seed(live)
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id="cmp", code="FLASH", usage_limit=25,
                                                allow_all_affiliates=True)),
        timeout=10,
    )
    same = await asyncio.gather(*(
        live.postback(campaign.postback_token, campaign_id="cmp", order_id="dup-1", amount="20.00",
                      currency="EUR", coupon="FLASH")
        for _ in range(20)
    ))
    assert {s for s, _ in same} == {200} and len({b["id"] for _, b in same}) == 1
    conflict = await live.postback(campaign.postback_token, campaign_id="cmp", order_id="dup-1",
                                   amount="21.00", currency="EUR", coupon="FLASH")
    assert conflict[0] == 409
    many = await asyncio.gather(*(
        live.postback(campaign.postback_token, campaign_id="cmp", order_id=f"o-{i}", amount="20.00",
                      currency="EUR", coupon="FLASH", customer_id=f"c{i}")
        for i in range(100)
    ))
    taken = [b for s, b in many if s == 200 and b["status"] != "rejected"]
    assert len(taken) == 24  # 25 uses, one taken by dup-1
    assert (await live.catalog.GetCoupon(pb.GetCouponRequest(campaign_id="cmp", code="FLASH"))).remaining == 0
    wrong = await live.postback("wrong-token", campaign_id="cmp", order_id="x", amount="1.00", currency="EUR")
    assert wrong[0] == 401
