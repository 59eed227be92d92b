"""Reports end to end: clicks and postbacks through the gateway, reports over gRPC, real processes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from services.attribution.reports import store as report_store
from tests.e2e.world import LiveWorld
from tests.support import ts

pytestmark = pytest.mark.slow
G = pb.ReportGroupBy


async def test_reports_equal_what_went_through_the_gateway(live: LiveWorld, database_url: str) -> None:
    campaign = await live.setup_campaign()
    await live.catalog.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff-a", name="A", channel="social")), timeout=10
    )
    for name, coupon_status in (("SUMMER", pb.COUPON_STATUS_ACTIVE), ("HELD", pb.COUPON_STATUS_HOLD)):
        await live.catalog.CreateCoupon(pb.CreateCouponRequest(coupon=pb.Coupon(
            campaign_id="cmp", code=name, usage_limit=50, affiliate_ids=["aff-a"], status=coupon_status,
        )), timeout=10)
    clicks = []
    for i in range(3):
        response = await live.click(visitor_ip=f"198.51.100.{i + 1}", campaign_id="cmp", aff_id="aff-a",
                                    coupon="summer", sub1="story")
        assert response.status == 302
        clicks.append(response.headers["X-Ascribe-Click-Id"])
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    sent: list[tuple[dict[str, str], str]] = [
        ({"order_id": "1", "amount": "100.00", "discount": "10.00", "click_id": clicks[0], "coupon": "SUMMER",
          "country": "DE", "device": "mobile"}, "pending"),
        ({"order_id": "2", "amount": "80.00", "click_id": clicks[1], "coupon": "SUMMER", "country": "DE",
          "device": "mobile"}, "pending"),
        ({"order_id": "3", "amount": "40.00", "click_id": clicks[2], "coupon": "SUMMER", "country": "DE",
          "device": "mobile"}, "pending"),
        ({"order_id": "4", "amount": "20.00", "coupon": "HELD", "country": "DE", "device": "mobile"}, "flagged"),
        ({"order_id": "5", "amount": "30.00", "coupon": "SUMMER", "currency": "USD", "country": "DE",
          "device": "mobile"}, "rejected"),
    ]
    for params, status in sent:
        code, body = await live.postback(
            campaign.postback_token, **{"campaign_id": "cmp", "currency": "EUR", "occurred_at": later, **params}
        )
        assert code == 200 and body["status"] == status, body
    for order_id, amount in (("2", 30_000_000), ("3", None)):
        refund = pb.ReverseConversionRequest(campaign_id="cmp", order_id=order_id, postback_token=campaign.postback_token,
                                             refund_id=f"r{order_id}" if amount else "")
        if amount:
            refund.amount_micros = amount
        await live.tracking.ReverseConversion(refund, timeout=10)

    reports = attribution_pb2_grpc.ReportServiceStub(live.channel)
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1, minutes=7, seconds=3), now + timedelta(hours=1, minutes=2)
    clicked = [await live.get_click(c) for c in clicks]

    async def rows(zone: str, *groups: pb.ReportGroupBy.ValueType) -> dict[tuple[str, ...], pb.ReportMetrics]:
        request = pb.GetReportRequest(to=ts(end), group_by=list(groups), time_zone=zone, campaign_id="cmp")
        getattr(request, "from").CopyFrom(ts(start))
        answer = await reports.GetReport(request, timeout=10)
        return {(*(r.keys[k] for k in sorted(r.keys)), r.metrics.currency): r.metrics for r in answer.rows}

    def numbers(m: pb.ReportMetrics) -> dict[str, Any]:
        return {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields if f.type != f.TYPE_DOUBLE}

    expected_eur = {
        "clicks": 3, "unique_clicks": 3, "tracked_clicks": 3, "rejected_clicks": 0,
        "conversions": 4, "pending": 2, "approved": 0, "flagged": 1, "rejected": 0, "reversed": 1,
        "currency": "EUR", "revenue_micros": 150_000_000, "discount_micros": 10_000_000,
        "payout_micros": 10_000_000, "refunded_micros": 70_000_000, "uses_taken": 3,
    }
    for zone in ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York"):
        by_day = await rows(zone, G.REPORT_GROUP_BY_DAY)
        clicks_by_day: dict[str, int] = {}
        for click in clicked:
            day = click.occurred_at.ToDatetime(tzinfo=UTC).astimezone(ZoneInfo(zone)).date().isoformat()
            clicks_by_day[day] = clicks_by_day.get(day, 0) + 1
        assert {k[0]: m.clicks for k, m in by_day.items() if m.clicks} == clicks_by_day, zone
        total_eur = await rows(zone)
        assert numbers(total_eur[("EUR",)]) == expected_eur, zone
        usd = numbers(total_eur[("USD",)])
        assert (usd["conversions"], usd["rejected"], usd["revenue_micros"]) == (1, 1, 0)
    by_place = await rows("Asia/Kolkata", G.REPORT_GROUP_BY_AFFILIATE, G.REPORT_GROUP_BY_CHANNEL,
                          G.REPORT_GROUP_BY_COUNTRY, G.REPORT_GROUP_BY_DEVICE, G.REPORT_GROUP_BY_SUB1)
    credited = numbers(by_place[("aff-a", "social", "DE", "mobile", "story", "EUR")])
    assert (credited["conversions"], credited["revenue_micros"], credited["payout_micros"]) == (3, 150_000_000, 10_000_000)

    conn = await asyncpg.connect(database_url)
    try:
        assert await report_store.drift(conn, start, end) == []
    finally:
        await conn.close()
