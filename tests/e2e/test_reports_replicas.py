"""Reports under replicas: two attribution processes on one PostgreSQL, one killed with SIGKILL mid-batch.

Issue #14, "Real time and exact": the totals equal the raw events with several
replicas writing at once, after refunds, reviews and approvals and after a
replica is killed mid-batch; a committed click or conversion is in reports
within 1 second on any replica. The expected numbers are computed here from the
clicks and conversions tables directly (not through the report's own views),
and checked against what the clients were told.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from services.attribution.reports import store as report_store
from tests.support import ts
from tools.stack import REPO, Ports, Stack, free_port

pytestmark = pytest.mark.slow
G = pb.ReportGroupBy

COUNTRIES = ("DE", "FR", "IN", "")
DEVICES = (pb.DEVICE_TYPE_MOBILE, pb.DEVICE_TYPE_DESKTOP, pb.DEVICE_TYPE_TABLET)
SUBS = ("story", "feed", "")
NUMBERS = (
    "clicks", "unique_clicks", "tracked_clicks", "rejected_clicks", "conversions", "pending", "approved",
    "flagged", "rejected", "reversed", "revenue_micros", "discount_micros", "payout_micros", "refunded_micros",
    "uses_taken",
)


@dataclass
class Replica:
    stack: Stack
    channel: grpc.aio.Channel
    catalog: attribution_pb2_grpc.CatalogServiceAsyncStub = field(init=False)
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub = field(init=False)
    reports: attribution_pb2_grpc.ReportServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.catalog = attribution_pb2_grpc.CatalogServiceStub(self.channel)
        self.tracking = attribution_pb2_grpc.TrackingServiceStub(self.channel)
        self.reports = attribution_pb2_grpc.ReportServiceStub(self.channel)


@pytest.fixture
async def replicas(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
    redis_client: Any,
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replica A (with the fraud service) and replica B, two attribution processes on one database."""
    env = {
        "ASCRIBE_IPINTEL_DIR": str(ipintel_dir),
        "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
        "ASCRIBE_CATALOG_CACHE_MS": "0",
        "ASCRIBE_FRAUD_DEADLINE_MS": "1000",
        # Both replicas fold the rollups' deltas while the others write: the
        # fold must not lose or double a delta either.
        "ASCRIBE_REPORT_COMPACT_INTERVAL_MS": "200",
    }
    a = Stack(database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path / "a", env=env)
    ports_a = a.ports
    b = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path / "b", env=env,
        ports=Ports(attribution=free_port(), fraud=ports_a.fraud, gateway=free_port(),
                    attribution_metrics=free_port(), fraud_metrics=free_port(), gateway_metrics=free_port()),
    )
    await asyncio.to_thread(a.start, ["fraud", "attribution"])
    try:
        await asyncio.to_thread(b.start, ["attribution"])
        channels = [grpc.aio.insecure_channel(s.addr("attribution")) for s in (a, b)]
        yield Replica(a, channels[0]), Replica(b, channels[1])
        for channel in channels:
            await channel.close()
    finally:
        await asyncio.to_thread(b.stop)
        await asyncio.to_thread(a.stop)


async def setup_catalog(replica: Replica) -> dict[str, pb.Campaign]:
    campaigns = {}
    for campaign_id, hold_days in (("held", 30), ("now", 0)):
        campaigns[campaign_id] = await replica.catalog.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(
            id=campaign_id, name=campaign_id, landing_url="https://shop.example/", currency="EUR",
            payout_micros=2_000_000, hold_days=hold_days,
        )), timeout=10)
    for affiliate_id, channel in (("aff-1", "social"), ("aff-2", "email")):
        await replica.catalog.CreateAffiliate(pb.CreateAffiliateRequest(
            affiliate=pb.Affiliate(id=affiliate_id, name=affiliate_id, channel=channel)), timeout=10)
    for campaign_id in campaigns:
        for code, status in (("SUMMER", pb.COUPON_STATUS_ACTIVE), ("HELD", pb.COUPON_STATUS_HOLD)):
            await replica.catalog.CreateCoupon(pb.CreateCouponRequest(coupon=pb.Coupon(
                campaign_id=campaign_id, code=code, allow_all_affiliates=True, usage_limit=100_000, status=status,
            )), timeout=10)
    return campaigns


@dataclass
class Sent:
    """What the clients were told was recorded (an OK answer), and what is unknown (a cut call)."""

    clicks: dict[str, str] = field(default_factory=dict)  # click id -> campaign
    conversions: dict[tuple[str, str], pb.Conversion] = field(default_factory=dict)
    cut_calls: int = 0
    batches: int = 0
    converting: bool = False  # a conversion batch is in flight


def click_batch(tag: str, n: int, size: int) -> pb.RecordClickBatchRequest:
    at = datetime.now(UTC) - timedelta(minutes=2)
    return pb.RecordClickBatchRequest(requests=[
        pb.RecordClickRequest(
            campaign_id=("held", "now")[i % 2], affiliate_id=("aff-1", "aff-2")[i % 3 % 2],
            coupon_code=("summer", "HELD", "", "NOPE")[i % 4], sub1=SUBS[i % 3], country=COUNTRIES[i % 4],
            ip=f"198.51.{(n * size + i) // 200 % 250}.{i % 200 + 1}", user_agent="Mozilla/5.0 (Windows NT 10.0)",
            external_click_id=f"{tag}-{n}-{i}", occurred_at=ts(at),
        )
        for i in range(size)
    ])


def conversion_batch(
    tag: str, n: int, size: int, clicks: Sequence[str], tokens: dict[str, str]
) -> pb.RecordConversionBatchRequest:
    later = datetime.now(UTC) + timedelta(minutes=1)  # an instant order after its click is ctit_too_short
    requests = []
    for i in range(size):
        campaign_id = ("held", "now")[i % 2]
        request = pb.RecordConversionRequest(
            campaign_id=campaign_id, order_id=f"{tag}-{n}-{i}", amount_micros=10_000_000 + 1_000 * i,
            discount_micros=500_000 * (i % 3), currency="EUR" if i % 7 else "USD",  # USD: rejected
            coupon_code=("SUMMER", "HELD", "")[i % 3], country=COUNTRIES[(i + 1) % 4], device_type=DEVICES[i % 3],
            occurred_at=ts(later), postback_token=tokens[campaign_id],
        )
        if clicks and i % 2 == 0:
            request.click_id = clicks[(n * size + i) % len(clicks)]
        requests.append(request)
    return pb.RecordConversionBatchRequest(requests=requests)


async def write(replica: Replica, tag: str, sent: Sent, tokens: dict[str, str], batches: int) -> None:
    """Alternating click and conversion batches; a call cut by a kill is counted, never retried."""
    own_clicks: list[str] = []
    for n in range(batches):
        try:
            clicks = await replica.tracking.RecordClickBatch(click_batch(tag, n, 100), timeout=20)
            for entry in clicks.responses:
                assert entry.HasField("response"), entry.error
                own_clicks.append(entry.response.click_id)
                sent.clicks[entry.response.click_id] = tag
            sent.converting = True
            conversions = await replica.tracking.RecordConversionBatch(
                conversion_batch(tag, n, 200, own_clicks, tokens), timeout=20)
            sent.converting = False
            for result in conversions.responses:
                assert result.HasField("conversion"), result.error
                c = result.conversion
                sent.conversions[(c.campaign_id, c.order_id)] = c
            sent.batches += 1
        except grpc.aio.AioRpcError as error:
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.INTERNAL), error
            sent.cut_calls += 1
            return


RAW_CLICKS = """
SELECT {keys} coalesce(cm.currency, '') AS currency, count(*) AS clicks,
       count(*) FILTER (WHERE k.is_unique) AS unique_clicks, count(k.coupon_code) AS tracked_clicks,
       count(*) FILTER (WHERE k.decision = 'rejected') AS rejected_clicks
  FROM clicks k JOIN campaigns cm ON cm.id = k.campaign_id LEFT JOIN affiliates a ON a.id = k.affiliate_id
 WHERE k.occurred_at >= $1 AND k.occurred_at < $2
 GROUP BY {group}
"""
RAW_CONVERSIONS = """
SELECT {keys} v.currency, count(*) AS conversions,
       count(*) FILTER (WHERE v.status = 'pending') AS pending,
       count(*) FILTER (WHERE v.status = 'approved') AS approved,
       count(*) FILTER (WHERE v.status = 'flagged') AS flagged,
       count(*) FILTER (WHERE v.status = 'rejected') AS rejected,
       count(*) FILTER (WHERE v.status = 'reversed') AS reversed,
       coalesce(sum(v.amount_micros - v.refunded_micros) FILTER (WHERE v.status IN ('pending', 'approved')), 0)
         AS revenue_micros,
       coalesce(sum(v.discount_micros) FILTER (WHERE v.status IN ('pending', 'approved')), 0) AS discount_micros,
       coalesce(sum(v.payout_micros) FILTER (WHERE v.status IN ('pending', 'approved')), 0) AS payout_micros,
       coalesce(sum(v.refunded_micros), 0) AS refunded_micros,
       count(*) FILTER (WHERE v.holds_coupon_use) AS uses_taken
  FROM conversions v LEFT JOIN clicks k ON k.click_id = v.click_id
 WHERE v.occurred_at >= $1 AND v.occurred_at < $2
 GROUP BY {group}
"""
# Each report group as a raw expression over clicks (k, a) and conversions (v).
CLICK_KEYS = {
    "campaign": "k.campaign_id", "coupon": "coalesce(k.coupon_code, '')", "affiliate": "k.affiliate_id",
    "channel": "coalesce(a.channel, '')", "sub1": "coalesce(k.sub1, '')", "country": "coalesce(k.country, '')",
    "device": "coalesce(k.device_type, '')",
    "day": "to_char(timezone($3::text, k.occurred_at), 'YYYY-MM-DD')",
    "hour": "date_trunc('hour', timezone($3::text, k.occurred_at))::text",
}
CONVERSION_KEYS = {
    "campaign": "v.campaign_id", "coupon": "coalesce(v.coupon_code, '')", "affiliate": "coalesce(v.affiliate_id, '')",
    "channel": "v.channel", "sub1": "coalesce(k.sub1, '')", "country": "v.country", "device": "v.device_type",
    "day": "to_char(timezone($3::text, v.occurred_at), 'YYYY-MM-DD')",
    "hour": "date_trunc('hour', timezone($3::text, v.occurred_at))::text",
}
GROUP_WORDS = {
    G.REPORT_GROUP_BY_CAMPAIGN: "campaign", G.REPORT_GROUP_BY_COUPON: "coupon",
    G.REPORT_GROUP_BY_AFFILIATE: "affiliate", G.REPORT_GROUP_BY_CHANNEL: "channel", G.REPORT_GROUP_BY_SUB1: "sub1",
    G.REPORT_GROUP_BY_COUNTRY: "country", G.REPORT_GROUP_BY_DEVICE: "device", G.REPORT_GROUP_BY_DAY: "day",
    G.REPORT_GROUP_BY_HOUR: "hour",
}


def _device_word(stored: str) -> str:
    """The report's device word for a stored device (the rows keep `mobile`, or the enum's name)."""
    word = stored.lower()
    return word.removeprefix("device_type_") if word.startswith("device_type_") else word


async def raw_rows(
    conn: asyncpg.Connection, start: datetime, end: datetime, groups: Sequence[str], zone: str
) -> dict[tuple[str, ...], dict[str, int]]:
    """The report's rows recomputed from the clicks and conversions tables; keys are sorted group words."""
    words = sorted(groups)
    timed = bool({"day", "hour"} & set(words))
    rows: dict[tuple[str, ...], dict[str, int]] = {}
    for template, exprs in ((RAW_CLICKS, CLICK_KEYS), (RAW_CONVERSIONS, CONVERSION_KEYS)):
        keys = "".join(f"{exprs[w]} AS k_{w}, " for w in words)
        # The key columns, then the currency.
        sql = template.format(keys=keys, group=", ".join(str(i + 1) for i in range(len(words) + 1)))
        args: list[object] = [start, end, *([zone] if timed else [])]
        for record in await conn.fetch(sql, *args):
            values = [str(record[f"k_{w}"]) for w in words]
            values = [_device_word(v) if w == "device" else v for w, v in zip(words, values, strict=True)]
            row = rows.setdefault((*values, record["currency"]), dict.fromkeys(NUMBERS, 0))
            for name in NUMBERS:
                if name in record:
                    row[name] += int(record[name])
    return rows


async def report_rows(
    replica: Replica, start: datetime, end: datetime, groups: Sequence[pb.ReportGroupBy.ValueType], zone: str
) -> dict[tuple[str, ...], dict[str, int]]:
    request = pb.GetReportRequest(to=ts(end), group_by=list(groups), time_zone=zone)
    getattr(request, "from").CopyFrom(ts(start))
    answer = await replica.reports.GetReport(request, timeout=10)
    rows = {}
    for r in answer.rows:
        numbers = {name: int(getattr(r.metrics, name)) for name in NUMBERS}
        if any(numbers.values()):
            rows[(*(r.keys[k] for k in sorted(r.keys)), r.metrics.currency)] = numbers
    return rows


async def exported_rows(
    replica: Replica, start: datetime, end: datetime, groups: Sequence[pb.ReportGroupBy.ValueType], zone: str
) -> dict[tuple[str, ...], dict[str, int]]:
    """``report_rows`` through ExportReport's stream."""
    request = pb.ExportReportRequest(to=ts(end), group_by=list(groups), time_zone=zone)
    getattr(request, "from").CopyFrom(ts(start))
    rows = {}
    async for chunk in replica.reports.ExportReport(request, timeout=10):
        for r in chunk.rows:
            numbers = {name: int(getattr(r.metrics, name)) for name in NUMBERS}
            if any(numbers.values()):
                rows[(*(r.keys[k] for k in sorted(r.keys)), r.metrics.currency)] = numbers
    return rows


def hour_shape(rows: dict[tuple[str, ...], dict[str, int]]) -> list[tuple[str, dict[str, int]]]:
    """Hour keys differ in spelling (RFC 3339 in the report, local wall time raw): compare in time order."""
    return [(key[-1], numbers) for key, numbers in sorted(rows.items())]


async def test_totals_equal_the_raw_events_after_a_replica_is_killed_mid_batch(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    started = time.monotonic()
    a, b = replicas
    campaigns = await setup_catalog(a)
    tokens = {campaign_id: c.postback_token for campaign_id, c in campaigns.items()}
    sent_a, sent_b = Sent(), Sent()

    writer_a = asyncio.create_task(write(a, "a", sent_a, tokens, batches=8))
    writer_b = asyncio.create_task(write(b, "b", sent_b, tokens, batches=1000))
    # B is well into its batches: kill it mid-way through a conversion batch (its
    # conversions commit one by one; a click batch is one statement), once the
    # first of that batch is committed and before B has answered.
    watcher = await asyncpg.connect(database_url)
    try:
        while not (sent_b.batches >= 3 and sent_b.converting and await watcher.fetchval(
            "SELECT count(*) FROM conversions WHERE order_id LIKE $1", f"b-{sent_b.batches}-%"
        )):
            await asyncio.sleep(0.002)
            assert time.monotonic() - started < 30, "replica B never got three batches through"
    finally:
        await watcher.close()
    await asyncio.to_thread(b.stack.kill_service, "attribution")
    await asyncio.wait_for(writer_b, 10)
    await asyncio.wait_for(writer_a, 30)
    assert sent_b.cut_calls == 1 and sent_a.cut_calls == 0
    assert sent_b.batches < 1000, "the kill came too late to prove anything"

    # Lifecycle on the survivor: full and partial refunds, reviews both ways.
    ok = {**sent_a.conversions, **sent_b.conversions}
    refunded_by_client = 0
    live = [c for c in ok.values() if c.status in (pb.CONVERSION_STATUS_PENDING, pb.CONVERSION_STATUS_APPROVED)]
    for i, c in enumerate(live[:20]):
        partial = i % 2 == 0
        request = pb.ReverseConversionRequest(campaign_id=c.campaign_id, order_id=c.order_id,
                                              postback_token=tokens[c.campaign_id],
                                              refund_id=f"r-{i}" if partial else "")
        if partial:
            request.amount_micros = 1_234_567
        reversed_ = await a.tracking.ReverseConversion(request, timeout=10)
        refunded_by_client += 1_234_567 if partial else c.amount_micros
        assert reversed_.refunded_micros == (1_234_567 if partial else c.amount_micros)
    flagged = [c for c in ok.values() if c.status == pb.CONVERSION_STATUS_FLAGGED]
    assert len(flagged) >= 4, "no flagged orders to review"
    for i, c in enumerate(flagged[:10]):
        await a.tracking.ReviewConversion(pb.ReviewConversionRequest(
            campaign_id=c.campaign_id, order_id=c.order_id, approve=i % 2 == 0, note="e2e"), timeout=10)

    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1, minutes=7, seconds=3), now + timedelta(hours=1, minutes=2, seconds=11)
    conn = await asyncpg.connect(database_url, server_settings={"TimeZone": "UTC"})
    try:
        # Nothing a client got an OK answer for is missing, and nothing is there twice.
        stored_clicks = {r["click_id"] for r in await conn.fetch("SELECT click_id FROM clicks")}
        assert set(sent_a.clicks) | set(sent_b.clicks) <= stored_clicks
        stored_orders = {(r["campaign_id"], r["order_id"]): r for r in await conn.fetch(
            "SELECT campaign_id, order_id, id FROM conversions")}
        assert set(ok) <= set(stored_orders)
        assert all(stored_orders[k]["id"] == c.id for k, c in ok.items())
        # The cut batch: a click batch is one statement, so all of it or none of it.
        b_clicks = await conn.fetchval("SELECT count(*) FROM clicks WHERE external_click_id LIKE 'b-%'")
        assert b_clicks - len(sent_b.clicks) in (0, 100), (b_clicks, len(sent_b.clicks))
        b_orders = sum(1 for campaign_id, order_id in stored_orders if order_id.startswith("b-"))
        assert b_orders > len(sent_b.conversions), "the kill did not land inside a conversion batch"
        print(f"OK answers: {len(sent_a.clicks) + len(sent_b.clicks)} clicks, {len(ok)} conversions; "
              f"B killed after {sent_b.batches} batches; of its cut conversion batch, "
              f"{b_orders - len(sent_b.conversions)} of 200 were committed without an answer")
        refunded_stored = await conn.fetchval("SELECT coalesce(sum(refunded_micros), 0) FROM conversions")
        assert refunded_stored == refunded_by_client

        groupings: list[tuple[str, list[pb.ReportGroupBy.ValueType]]] = [
            ("UTC", []),
            ("UTC", [G.REPORT_GROUP_BY_CAMPAIGN]),
            ("UTC", [G.REPORT_GROUP_BY_COUPON, G.REPORT_GROUP_BY_AFFILIATE]),
            ("UTC", [G.REPORT_GROUP_BY_CHANNEL, G.REPORT_GROUP_BY_COUNTRY, G.REPORT_GROUP_BY_DEVICE,
                     G.REPORT_GROUP_BY_SUB1]),
            ("Asia/Kolkata", [G.REPORT_GROUP_BY_DAY, G.REPORT_GROUP_BY_CAMPAIGN]),
        ]
        for zone, groups in groupings:
            words = [GROUP_WORDS[g] for g in groups]
            reported = await report_rows(a, start, end, groups, zone)
            raw = await raw_rows(conn, start, end, words, zone)
            assert reported == raw, (zone, words)
            assert await exported_rows(a, start, end, groups, zone) == raw, (zone, words)
        total = await report_rows(a, start, end, [], "UTC")
        assert total[("EUR",)]["refunded_micros"] + total.get(("USD",), {}).get("refunded_micros", 0) == (
            refunded_by_client)
        assert sum(n["clicks"] for n in total.values()) == len(stored_clicks)
        # Every state the issue names is in the race (else equality would prove little).
        eur = total[("EUR",)]
        assert all(eur[k] > 0 for k in ("tracked_clicks", "pending", "approved", "flagged", "rejected",
                                        "reversed", "discount_micros", "payout_micros", "uses_taken")), eur
        assert total[("USD",)]["rejected"] > 0
        assert sum(n["conversions"] for n in total.values()) == len(stored_orders)
        for zone in ("Asia/Kathmandu", "America/New_York"):
            reported = await report_rows(a, start, end, [G.REPORT_GROUP_BY_HOUR], zone)
            raw = await raw_rows(conn, start, end, ["hour"], zone)
            assert [n for _, n in hour_shape(reported)] == [n for _, n in hour_shape(raw)], zone
    finally:
        await conn.close()

    # The drift check, as `make report-drift` runs it, over the same range.
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.attribution.reports.drift", "--from", start.isoformat(),
         "--to", end.isoformat()],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ASCRIBE_DATABASE_URL": database_url,
             "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])},
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no drift" in check.stdout
    assert time.monotonic() - started < 60


async def _until(condition: Any, bound: float) -> float:
    """Seconds until ``await condition()`` held, polling; fails past ``bound``."""
    began = time.monotonic()
    while not await condition():
        assert time.monotonic() - began < bound, f"not in the report within {bound}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_a_committed_click_and_conversion_are_in_the_other_replicas_report_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    campaigns = await setup_catalog(a)
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=33, seconds=7), now + timedelta(minutes=41, seconds=3)
    for writer, reader in ((b, a), (a, b)):
        await _seen_on_the_other_replica(writer, reader, campaigns["now"].postback_token, start, end)


async def _seen_on_the_other_replica(
    writer: Replica, reader: Replica, token: str, start: datetime, end: datetime
) -> None:
    async def totals() -> dict[str, int]:
        request = pb.GetReportRequest(to=ts(end), campaign_id="now")
        getattr(request, "from").CopyFrom(ts(start))
        answer = await reader.reports.GetReport(request, timeout=1)
        return {name: int(getattr(r.metrics, name)) for r in answer.rows for name in NUMBERS}

    before = await totals()
    click = await writer.tracking.RecordClick(pb.RecordClickRequest(
        campaign_id="now", affiliate_id="aff-1", coupon_code="SUMMER", ip="203.0.113.9",
        user_agent="Mozilla/5.0 (Windows NT 10.0)"), timeout=5)

    async def click_seen() -> bool:
        return (await totals()).get("clicks", 0) == before.get("clicks", 0) + 1

    click_after = await _until(click_seen, 1.0)
    conversion = await writer.tracking.RecordConversion(pb.RecordConversionRequest(
        campaign_id="now", order_id=f"o-{click.click_id}", click_id=click.click_id, amount_micros=7_000_000,
        currency="EUR", postback_token=token, occurred_at=ts(datetime.now(UTC) + timedelta(minutes=1))), timeout=5)
    assert conversion.status == pb.CONVERSION_STATUS_APPROVED, conversion.reasons

    async def conversion_seen() -> bool:
        seen = await totals()
        return (seen.get("approved", 0), seen.get("revenue_micros", 0)) == (
            before.get("approved", 0) + 1, before.get("revenue_micros", 0) + 7_000_000)

    conversion_after = await _until(conversion_seen, 1.0)
    print(f"in the other replica's report after: click {click_after * 1000:.0f} ms, "
          f"conversion {conversion_after * 1000:.0f} ms")
    assert click_after < 1.0 and conversion_after < 1.0


async def test_a_click_counts_under_its_affiliates_channel_at_the_time_of_the_click(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    """The same click in a rollup bucket and in a report's raw edge: one channel, the one at click time."""
    a, b = replicas
    await setup_catalog(a)
    at = datetime.now(UTC).replace(second=30, microsecond=0) - timedelta(minutes=20)
    click = await b.tracking.RecordClick(pb.RecordClickRequest(
        campaign_id="now", affiliate_id="aff-1", ip="203.0.113.10", user_agent="Mozilla/5.0 (Windows NT 10.0)",
        occurred_at=ts(at)), timeout=5)
    assert click.click_id
    await a.catalog.UpdateAffiliate(pb.UpdateAffiliateRequest(
        affiliate=pb.Affiliate(id="aff-1", name="aff-1", channel="search")), timeout=10)

    async def channels(start: datetime, end: datetime) -> dict[str, int]:
        request = pb.GetReportRequest(to=ts(end), campaign_id="now", group_by=[G.REPORT_GROUP_BY_CHANNEL])
        getattr(request, "from").CopyFrom(ts(start))
        answer = await a.reports.GetReport(request, timeout=5)
        return {r.keys["channel"]: r.metrics.clicks for r in answer.rows if r.metrics.clicks}

    from_rollups = await channels(at - timedelta(hours=1), at + timedelta(hours=1))  # whole buckets around it
    from_raw_edge = await channels(at - timedelta(seconds=1), at + timedelta(seconds=1))  # no whole bucket
    assert from_rollups == {"social": 1}
    assert from_raw_edge == from_rollups


async def test_refunds_and_reviews_racing_on_both_replicas_keep_the_totals_exact(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    """The same orders refunded (partly and fully) and reviewed (both ways) through both replicas at once."""
    a, b = replicas
    campaigns = await setup_catalog(a)
    token = campaigns["held"].postback_token
    later = ts(datetime.now(UTC) + timedelta(minutes=1))
    recorded = await a.tracking.RecordConversionBatch(pb.RecordConversionBatchRequest(requests=[
        pb.RecordConversionRequest(
            campaign_id="held", order_id=f"o-{i}", amount_micros=50_000_000, discount_micros=1_000_000,
            currency="EUR", coupon_code="HELD" if i >= 30 else "SUMMER", country="DE",
            device_type=pb.DEVICE_TYPE_MOBILE, occurred_at=later, postback_token=token,
        )
        for i in range(40)
    ]), timeout=20)
    statuses = [r.conversion.status for r in recorded.responses]
    assert statuses == [pb.CONVERSION_STATUS_PENDING] * 30 + [pb.CONVERSION_STATUS_FLAGGED] * 10, statuses

    async def refund(replica: Replica, order: int, refund_id: str, amount: int | None) -> int:
        request = pb.ReverseConversionRequest(campaign_id="held", order_id=f"o-{order}", refund_id=refund_id,
                                              postback_token=token)
        if amount is not None:
            request.amount_micros = amount
        try:
            await replica.tracking.ReverseConversion(request, timeout=10)
        except grpc.aio.AioRpcError as error:  # the other replica's full refund came first
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            return 0
        return 1

    async def review(replica: Replica, order: int, approve: bool) -> pb.ConversionStatus.ValueType:
        try:
            answer = await replica.tracking.ReviewConversion(pb.ReviewConversionRequest(
                campaign_id="held", order_id=f"o-{order}", approve=approve), timeout=10)
        except grpc.aio.AioRpcError as error:  # the other replica's review came first
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            return pb.CONVERSION_STATUS_UNSPECIFIED
        return answer.status

    partial = [refund(r, i, f"{tag}-{i}", 1_000_000) for i in range(20) for r, tag in ((a, "ra"), (b, "rb"))]
    full = [refund(r, i, "", None) for i in range(20, 30) for r in (a, b)]
    reviews = [review(r, i, approve) for i in range(30, 40) for r, approve in ((a, True), (b, False))]
    partial_ok = await asyncio.gather(*partial)
    full_ok = await asyncio.gather(*full)
    reviewed = await asyncio.gather(*reviews)
    assert sum(partial_ok) == 40
    assert sum(full_ok) >= 10  # at least one of each pair; a retried full refund may also answer OK
    assert sum(s != pb.CONVERSION_STATUS_UNSPECIFIED for s in reviewed) >= 10

    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=47, seconds=13), now + timedelta(minutes=16, seconds=29)
    conn = await asyncpg.connect(database_url, server_settings={"TimeZone": "UTC"})
    try:
        by_status: dict[str, int] = {
            r["status"]: r["count"] for r in await conn.fetch("SELECT status, count(*) FROM conversions GROUP BY status")
        }
        # An approved review sends a flagged order on to its hold (pending); a rejection ends it.
        assert by_status.get("reversed") == 10 and set(by_status) <= {"reversed", "pending", "rejected"}, by_status
        assert by_status["pending"] + by_status.get("rejected", 0) == 30, by_status
        released = by_status["pending"] - 20
        refunded = await conn.fetchval("SELECT sum(refunded_micros) FROM conversions")
        assert refunded == 20 * 2_000_000 + 10 * 50_000_000
        for zone, groups in (("UTC", []), ("Asia/Kathmandu", [G.REPORT_GROUP_BY_DAY, G.REPORT_GROUP_BY_COUPON])):
            words = [GROUP_WORDS[g] for g in groups]
            for replica in (a, b):
                assert await report_rows(replica, start, end, groups, zone) == await raw_rows(
                    conn, start, end, words, zone), (zone, words)
        total = (await report_rows(b, start, end, [], "UTC"))[("EUR",)]
        assert total["refunded_micros"] == refunded
        assert total["revenue_micros"] == 20 * 48_000_000 + released * 50_000_000
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            assert await report_store.drift(conn, start, end) == []
    finally:
        await conn.close()
