"""Reports against real PostgreSQL: known events, number by number, in several zones.

Every test ends with the drift check (the report's sums recomputed from the
raw events) at zero.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from typer.testing import CliRunner

from ascribe_cli.app import app
from services.attribution.reports import rules
from services.attribution.reports import store as report_store
from services.attribution.reports.drift import check as drift_check
from services.attribution.reports.drift import main as drift_main
from tests.integration.conversion_env import World, ts
from tests.support import bad_request_fields

IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
)
G = pb.ReportGroupBy


def reports(world: World) -> attribution_pb2_grpc.ReportServiceAsyncStub:
    return attribution_pb2_grpc.ReportServiceStub(world.replicas[0].channel)


async def report(
    world: World, start: datetime, end: datetime, *groups: pb.ReportGroupBy.ValueType, **fields: Any
) -> list[pb.ReportRow]:
    request = pb.GetReportRequest(to=ts(end), group_by=list(groups), **fields)
    getattr(request, "from").CopyFrom(ts(start))
    answer = await reports(world).GetReport(request, timeout=10)
    return list(answer.rows)


def metrics(row: pb.ReportRow) -> dict[str, Any]:
    m = row.metrics
    return {
        f.name: getattr(m, f.name)
        for f in m.DESCRIPTOR.fields
        if f.type != f.TYPE_DOUBLE and getattr(m, f.name)
    }


def by_keys(rows: list[pb.ReportRow]) -> dict[tuple[tuple[str, str], ...], dict[str, Any]]:
    return {(*tuple(sorted(r.keys.items())), ("currency", r.metrics.currency)): metrics(r) for r in rows}


async def assert_no_drift(world: World, start: datetime, end: datetime) -> None:
    assert await report_store.drift(world.db, start, end) == []


@pytest.fixture
async def known(world: World) -> datetime:
    """A campaign with known clicks, orders, refunds, a flagged and a rejected order; answers T."""
    await world.campaign()  # EUR, 5.00 fixed payout
    await world.affiliate("a1", channel="social")
    await world.affiliate("a2", channel="email")
    await world.coupon("SAVE", usage_limit=100, allow_all_affiliates=True)
    await world.coupon("HELD", usage_limit=5, allow_all_affiliates=True, status=pb.COUPON_STATUS_HOLD)
    t = world.clock.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    k1 = await world.click("a1", coupon_code="SAVE", sub1="s1", country="DE", occurred_at=ts(t + timedelta(minutes=5)))
    await world.click("a2", coupon_code="NOPE", sub1="s2", user_agent=IPHONE_UA,
                      occurred_at=ts(t + timedelta(minutes=20)))
    k3 = await world.click("a1", coupon_code="SAVE", sub1="s1", country="DE", occurred_at=ts(t + timedelta(minutes=6)))
    k4 = await world.click("a1", coupon_code="SAVE", sub1="s1", country="DE", occurred_at=ts(t + timedelta(minutes=7)))
    a = await world.convert(order_id="A", click_id=k1, coupon_code="SAVE", amount_micros=100_000_000,
                            discount_micros=10_000_000, occurred_at=ts(t + timedelta(minutes=30)))
    b = await world.convert(order_id="B", coupon_code="SAVE", amount_micros=50_000_000, country="FR",
                            device_type=pb.DEVICE_TYPE_MOBILE, occurred_at=ts(t + timedelta(minutes=40)))
    c = await world.convert(order_id="C", click_id=k3, coupon_code="SAVE", amount_micros=80_000_000,
                            occurred_at=ts(t + timedelta(minutes=41)))
    d = await world.convert(order_id="D", click_id=k4, coupon_code="SAVE", amount_micros=40_000_000,
                            occurred_at=ts(t + timedelta(minutes=42)))
    e = await world.convert(order_id="E", coupon_code="HELD", amount_micros=20_000_000,
                            occurred_at=ts(t + timedelta(minutes=50)))
    f = await world.convert(order_id="F", coupon_code="SAVE", amount_micros=30_000_000, currency="USD",
                            occurred_at=ts(t + timedelta(minutes=55)))
    assert [x.status for x in (a, b, c, d)] == [pb.CONVERSION_STATUS_PENDING] * 4
    assert e.status == pb.CONVERSION_STATUS_FLAGGED and f.status == pb.CONVERSION_STATUS_REJECTED
    assert a.affiliate_id == "a1" and b.affiliate_id == ""
    await world.refund("C", refund_id="r1", amount_micros=30_000_000)
    await world.refund("D")
    return t


async def test_totals_equal_what_was_sent(world: World, known: datetime) -> None:
    t = known
    rows = by_keys(await report(world, t - timedelta(minutes=1), t + timedelta(hours=2)))
    assert rows == {
        (("currency", "EUR"),): {
            "clicks": 4, "unique_clicks": 4, "tracked_clicks": 3,
            "conversions": 5, "pending": 3, "flagged": 1, "reversed": 1, "currency": "EUR",
            "revenue_micros": 200_000_000, "discount_micros": 10_000_000, "payout_micros": 10_000_000,
            "refunded_micros": 70_000_000, "uses_taken": 4,
        },
        # the rejected order in another currency is never mixed into the EUR row
        (("currency", "USD"),): {"conversions": 1, "rejected": 1, "currency": "USD"},
    }
    await assert_no_drift(world, t - timedelta(days=1), t + timedelta(days=1))


async def test_groups_by_affiliate_channel_sub1_country_device(world: World, known: datetime) -> None:
    t = known
    rows = by_keys(await report(world, t, t + timedelta(hours=2), G.REPORT_GROUP_BY_AFFILIATE,
                                G.REPORT_GROUP_BY_CHANNEL, G.REPORT_GROUP_BY_SUB1))
    assert rows == {
        (("affiliate", "a1"), ("channel", "social"), ("sub1", "s1"), ("currency", "EUR")): {
            "clicks": 3, "unique_clicks": 3, "tracked_clicks": 3, "conversions": 3, "pending": 2, "reversed": 1,
            "currency": "EUR", "revenue_micros": 150_000_000, "discount_micros": 10_000_000,
            "payout_micros": 10_000_000, "refunded_micros": 70_000_000, "uses_taken": 2,
        },
        (("affiliate", "a2"), ("channel", "email"), ("sub1", "s2"), ("currency", "EUR")): {
            "clicks": 1, "unique_clicks": 1, "currency": "EUR",
        },
        (("affiliate", ""), ("channel", "direct"), ("sub1", ""), ("currency", "EUR")): {
            "conversions": 2, "pending": 1, "flagged": 1, "currency": "EUR", "revenue_micros": 50_000_000,
            "uses_taken": 2,
        },
        (("affiliate", ""), ("channel", "direct"), ("sub1", ""), ("currency", "USD")): {
            "conversions": 1, "rejected": 1, "currency": "USD",
        },
    }
    countries = by_keys(await report(world, t, t + timedelta(hours=2), G.REPORT_GROUP_BY_COUNTRY,
                                     G.REPORT_GROUP_BY_DEVICE, G.REPORT_GROUP_BY_COUPON))
    de = countries[(("country", "DE"), ("coupon", "SAVE"), ("device", "desktop"), ("currency", "EUR"))]
    assert de["clicks"] == 3 and de["conversions"] == 3  # orders without a country take their click's
    fr = countries[(("country", "FR"), ("coupon", "SAVE"), ("device", "mobile"), ("currency", "EUR"))]
    assert fr["conversions"] == 1 and fr["revenue_micros"] == 50_000_000
    # a click that tracked no code counts under coupon "", whatever code it asked for
    assert countries[(("country", ""), ("coupon", ""), ("device", "mobile"), ("currency", "EUR"))]["clicks"] == 1
    filtered = by_keys(await report(world, t, t + timedelta(hours=2), country="de", sub1="s1"))
    assert filtered[(("currency", "EUR"),)]["conversions"] == 3


async def test_unaligned_edges_are_exact(world: World, known: datetime) -> None:
    t = known
    # [t+6m, t+35m): k3 and k4 in the partial first bucket, the NOPE click in a
    # whole bucket, order A (t+30m) in the partial last one
    rows = await report(world, t + timedelta(minutes=6), t + timedelta(minutes=35))
    assert len(rows) == 1
    assert (rows[0].metrics.clicks, rows[0].metrics.conversions) == (3, 1)
    rows = await report(world, t + timedelta(minutes=6, microseconds=1), t + timedelta(minutes=30))
    assert (rows[0].metrics.clicks, rows[0].metrics.conversions) == (2, 0)
    await assert_no_drift(world, t + timedelta(minutes=6, seconds=7), t + timedelta(minutes=41, seconds=3))


async def test_lifecycle_changes_move_orders_at_once(world: World, known: datetime) -> None:
    t = known
    window = (t, t + timedelta(hours=2))
    await world.tracking.ReviewConversion(
        pb.ReviewConversionRequest(campaign_id="cmp", order_id="E", approve=False), timeout=10
    )
    world.clock.now += timedelta(days=31)
    assert await world.replicas[0].service.lifecycle.approve_all_due() == 3
    total = by_keys(await report(world, *window))[(("currency", "EUR"),)]
    assert (total["approved"], total["rejected"], total.get("pending", 0), total.get("flagged", 0)) == (3, 1, 0, 0)
    assert total["revenue_micros"] == 200_000_000 and total["uses_taken"] == 3
    await report_store.compact(world.replicas[0].service.pool)
    assert by_keys(await report(world, *window))[(("currency", "EUR"),)] == total
    await assert_no_drift(world, t - timedelta(days=1), t + timedelta(days=1))


async def test_days_and_hours_in_every_zone(world: World) -> None:
    await world.campaign("tz")
    await world.affiliate("a1")
    instants = [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # 01:30 EDT in New York
        datetime(2026, 11, 1, 6, 30, tzinfo=UTC),  # 01:30 EST, an hour later
        datetime(2026, 11, 1, 18, 14, tzinfo=UTC),  # 23:59 in Kathmandu (+05:45)
        datetime(2026, 11, 1, 18, 16, tzinfo=UTC),  # 00:01 next day in Kathmandu
        datetime(2026, 11, 1, 18, 29, tzinfo=UTC),  # 23:59 in Kolkata (+05:30)
        datetime(2026, 11, 1, 18, 31, tzinfo=UTC),  # 00:01 next day in Kolkata
    ]
    for at in instants:
        await world.click("a1", campaign_id="tz", occurred_at=ts(at))
    start, end = datetime(2026, 10, 31, 1, 2, 3, tzinfo=UTC), datetime(2026, 11, 3, 4, 5, 6, tzinfo=UTC)

    async def days(zone: str) -> dict[str, int]:
        rows = await report(world, start, end, G.REPORT_GROUP_BY_DAY, campaign_id="tz", time_zone=zone)
        return {r.keys["day"]: r.metrics.clicks for r in rows}

    async def hours(zone: str) -> dict[str, int]:
        rows = await report(world, start, end, G.REPORT_GROUP_BY_HOUR, campaign_id="tz", time_zone=zone)
        return {r.keys["hour"]: r.metrics.clicks for r in rows}

    assert await days("Asia/Kolkata") == {"2026-11-01": 5, "2026-11-02": 1}
    assert await days("Asia/Kathmandu") == {"2026-11-01": 3, "2026-11-02": 3}
    assert await days("America/New_York") == {"2026-11-01": 6}
    assert await days("") == {"2026-11-01": 6}
    ny = await hours("America/New_York")
    assert ny["2026-11-01T01:00:00-04:00"] == 1 and ny["2026-11-01T01:00:00-05:00"] == 1
    kolkata = await hours("Asia/Kolkata")
    assert kolkata["2026-11-01T23:00:00+05:30"] == 3 and kolkata["2026-11-02T00:00:00+05:30"] == 1
    kathmandu = await hours("Asia/Kathmandu")
    assert kathmandu["2026-11-01T23:00:00+05:45"] == 1 and kathmandu["2026-11-02T00:00:00+05:45"] == 3
    await assert_no_drift(world, start, end)


async def test_bad_requests_name_the_field(world: World) -> None:
    now = world.clock.now
    cases: list[tuple[dict[str, Any], str]] = [
        ({"start": now, "end": now}, "from"),
        ({"start": now, "end": now + timedelta(days=401)}, "to"),
        ({"start": now, "end": now + timedelta(hours=1), "time_zone": "Mars/Olympus"}, "time_zone"),
        ({"start": now, "end": now + timedelta(hours=1), "group_by": [99]}, "group_by"),
        ({"start": now, "end": now + timedelta(hours=1), "country": "DEU"}, "country"),
        # a NUL in a text filter was a PostgreSQL error, answered INTERNAL
        ({"start": now, "end": now + timedelta(hours=1), "sub1": "a\x00b"}, "sub1"),
        ({"start": now, "end": now + timedelta(hours=1), "campaign_id": "c\x00"}, "campaign_id"),
        ({"start": now, "end": now + timedelta(hours=1), "coupon_code": "\x00SAVE"}, "coupon_code"),
        ({"start": now, "end": now + timedelta(hours=1), "affiliate_id": "a\x00"}, "affiliate_id"),
        ({"start": now, "end": now + timedelta(hours=1), "time_zone": "UTC\x00"}, "time_zone"),
    ]
    for fields, field in cases:
        request = pb.GetReportRequest(to=ts(fields.pop("end")), **{k: v for k, v in fields.items() if k != "start"})
        getattr(request, "from").CopyFrom(ts(fields["start"]))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await reports(world).GetReport(request, timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_request_fields(bad.value)


async def test_a_range_in_the_last_day_of_year_9999_is_answered(world: World) -> None:
    """Its whole-day tier has no next day: that raised OverflowError, answered INTERNAL."""
    await world.campaign()
    start, end = datetime(9999, 12, 31, 0, 0, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    rows = await report(world, start, end, campaign_id="cmp")
    assert all(metrics(r) == {} for r in rows)


async def test_a_zone_python_knows_and_postgresql_does_not_is_a_bad_time_zone(
    world: World, known: datetime, tmp_path: Path
) -> None:
    """The two zone databases differ (the embedded PostgreSQL has no posix/ or right/ zones, nor
    localtime): a name only Python knew passed validation and PostgreSQL's error was INTERNAL."""
    t = known
    (tmp_path / "Review").mkdir()
    shutil.copy(Path(zoneinfo.TZPATH[0]) / "Europe" / "Berlin", tmp_path / "Review" / "Nowhere")
    saved = zoneinfo.TZPATH
    zoneinfo.reset_tzpath([str(tmp_path), *saved])
    try:
        assert rules.valid_time_zone("Review/Nowhere")  # Python knows it now; PostgreSQL does not
        for call in ("get", "export"):
            request = pb.GetReportRequest(to=ts(t + timedelta(hours=2)), group_by=[G.REPORT_GROUP_BY_DAY],
                                          time_zone="Review/Nowhere")
            getattr(request, "from").CopyFrom(ts(t - timedelta(minutes=1)))
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                if call == "get":
                    await reports(world).GetReport(request, timeout=10)
                else:
                    export = pb.ExportReportRequest.FromString(request.SerializeToString())
                    async for _ in reports(world).ExportReport(export, timeout=10):
                        pass
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, bad.value)
            assert bad_request_fields(bad.value) == ["time_zone"]
    finally:
        zoneinfo.reset_tzpath(saved)


async def test_export_streams_the_same_rows(world: World, known: datetime) -> None:
    t = known
    request = pb.ExportReportRequest(to=ts(t + timedelta(hours=2)), group_by=[G.REPORT_GROUP_BY_COUPON], campaign_id="cmp")
    getattr(request, "from").CopyFrom(ts(t))
    got = [row async for chunk in reports(world).ExportReport(request, timeout=10) for row in chunk.rows]
    assert got == await report(world, t, t + timedelta(hours=2), G.REPORT_GROUP_BY_COUPON, campaign_id="cmp")
    save = next(r for r in got if r.keys["coupon"] == "SAVE" and r.metrics.currency == "EUR")
    assert save.pace.remaining == 97  # A, B and C hold a use (D was refunded); F was rejected
    # three live uses taken in the last 24 hours: 97 left last 97 / 3 days at that pace
    assert save.pace.uses_per_day == 3.0 and save.pace.HasField("exhausted_at_forecast")
    forecast = save.pace.exhausted_at_forecast.ToDatetime(tzinfo=UTC)
    assert abs(forecast - (world.clock.now + timedelta(days=97 / 3))) < timedelta(seconds=1)
    assert not save.pace.exhausted_before_valid_until  # the code has no valid_until
    coupons = await world.tracking.ListConversions(
        pb.ListConversionsRequest(campaign_id="cmp", coupon_code="held"), timeout=10
    )
    assert [c.order_id for c in coupons.conversions] == ["E"]


async def test_no_drift_after_a_multi_replica_race(world: World) -> None:
    await world.campaign()
    await world.affiliate("a1")
    await world.coupon("RACE", usage_limit=1000, allow_all_affiliates=True)
    second = await world.add_replica()
    t = world.clock.now - timedelta(minutes=30)

    async def order(i: int) -> None:
        replica = world.replicas[i % 2]
        click = await world.click("a1", coupon_code="RACE", sub1=f"s{i % 3}", occurred_at=ts(t + timedelta(seconds=i)))
        done = await world.convert(replica, order_id=f"o{i}", click_id=click, coupon_code="RACE",
                                   amount_micros=1_000_000 * (i + 1), occurred_at=ts(t + timedelta(minutes=10, seconds=i)))
        assert done.status == pb.CONVERSION_STATUS_PENDING, done.reasons
        if i % 3 == 0:
            await world.refund(f"o{i}", refund_id="part", amount_micros=500_000)
        if i % 5 == 0:
            await world.refund(f"o{i}")

    async def compact_often() -> None:
        for _ in range(10):
            await report_store.compact(world.replicas[_ % 2].service.pool)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(order(i) for i in range(40)), compact_often(), compact_often())
    await report_store.compact(second.service.pool)
    rows = await report(world, t - timedelta(hours=1), t + timedelta(hours=1))
    assert rows[0].metrics.clicks == 40 and rows[0].metrics.conversions == 40
    assert rows[0].metrics.reversed == 8  # every fifth order fully refunded
    # two days each side: whole UTC days come from the daily tier
    await assert_no_drift(world, t - timedelta(days=2), t + timedelta(days=2))
    by_code = await report(world, t - timedelta(days=2), t + timedelta(days=2), G.REPORT_GROUP_BY_COUPON)
    assert [(r.keys["coupon"], r.metrics.clicks, r.metrics.conversions) for r in by_code] == [("RACE", 40, 40)]


async def test_the_cli_report_and_the_drift_check(world: World, known: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    t = known
    env = {"ASCRIBE_ATTRIBUTION_ADDR": f"127.0.0.1:{world.replicas[0].service.port}"}
    args = ["report", "--from", (t - timedelta(minutes=1)).isoformat(), "--to", (t + timedelta(hours=2)).isoformat(),
            "-g", "affiliate", "--campaign", "cmp"]
    result = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    rows = {(r["affiliate"], r["currency"]): r for r in json.loads(result.stdout)}
    assert rows[("a1", "EUR")]["revenue_micros"] == 150_000_000 and rows[("a1", "EUR")]["clicks"] == 3
    assert rows[("", "USD")]["rejected"] == 1
    result = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--format", "csv"], env=env)
    assert result.stdout.splitlines()[0].startswith("affiliate,clicks,unique_clicks")
    bad = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--tz", "Nowhere/Land"], env=env)
    assert bad.exit_code == 1 and "time_zone" in bad.stderr

    window = ["--from", (t - timedelta(days=1)).isoformat(), "--to", (t + timedelta(days=1)).isoformat()]
    assert await asyncio.to_thread(drift_main, window, world.database_url) == 0
    # a rollup row that no event explains is drift, named by its key and sum
    await world.db.execute(
        """INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                                      device, clicks)
           VALUES ($1, 'cmp', 'EUR', '', 'a1', 'social', 's1', 'DE', 'desktop', 1)""",
        t + timedelta(minutes=15),
    )
    capsys.readouterr()
    assert await asyncio.to_thread(drift_main, window, world.database_url) == 1
    assert "clicks: report 1, raw events 0" in capsys.readouterr().out


async def test_the_cli_report_by_coupon_as_csv_has_the_pace_columns(world: World, known: datetime) -> None:
    """The columns were the first row's: a code without a limit (or "", no code) first, then a
    limited code's pace made csv.DictWriter raise, and the command failed."""
    t = known
    env = {"ASCRIBE_ATTRIBUTION_ADDR": f"127.0.0.1:{world.replicas[0].service.port}"}
    args = ["report", "--from", (t - timedelta(minutes=1)).isoformat(), "--to", (t + timedelta(hours=2)).isoformat(),
            "-g", "coupon", "--campaign", "cmp", "--format", "csv"]
    result = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split(",")
    assert header[0] == "coupon" and "remaining" in header
    remaining = {line.split(",")[0]: line.split(",")[header.index("remaining")] for line in lines[1:]}
    assert remaining[""] == "" and remaining["SAVE"] != ""


async def test_the_drift_check_sees_one_moment_while_events_are_written(
    world: World, known: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report side and the raw side are read in one snapshot: a click committed between the
    two reads was drift on a live system (one side had it, the other not)."""
    t = known
    real_sums = report_store.sums
    written: list[str] = []

    async def sums_then_a_click(conn: Any, query: Any, source: Any = "report") -> Any:
        found = await real_sums(conn, query, source)
        if not written:  # between the first report read and its raw recomputation
            written.append(await world.click("a1", coupon_code="SAVE", occurred_at=ts(t + timedelta(minutes=50))))
        return found

    monkeypatch.setattr(report_store, "sums", sums_then_a_click)
    assert await drift_check(world.database_url, t - timedelta(days=1), t + timedelta(days=1)) == 0
    assert written
    monkeypatch.undo()
    await assert_no_drift(world, t - timedelta(days=1), t + timedelta(days=1))


async def test_a_visitors_first_click_per_campaign_and_affiliate_in_a_day_is_unique(world: World) -> None:
    await world.campaign()
    for affiliate in ("a1", "a2"):
        await world.affiliate(affiliate)
    t = world.clock.now - timedelta(hours=1)
    ids = [
        await world.click("a1", ip="198.51.100.7", occurred_at=ts(t)),
        await world.click("a1", ip="198.51.100.7", occurred_at=ts(t + timedelta(minutes=1))),  # again: not unique
        await world.click("a2", ip="198.51.100.7", occurred_at=ts(t + timedelta(minutes=2))),  # another affiliate
        await world.click("a1", ip="198.51.100.7", user_agent=IPHONE_UA, occurred_at=ts(t + timedelta(minutes=3))),
        await world.click("a1", ip="198.51.100.8", occurred_at=ts(t + timedelta(minutes=4))),  # another IP
    ]
    stored = await world.db.fetch("SELECT click_id, is_unique FROM clicks")
    unique = {r["click_id"]: r["is_unique"] for r in stored}
    assert [unique[i] for i in ids] == [True, False, True, True, True]
    rows = await report(world, t - timedelta(minutes=1), t + timedelta(minutes=10))
    assert (rows[0].metrics.clicks, rows[0].metrics.unique_clicks) == (5, 4)


async def test_clicks_are_unique_while_fraud_is_unavailable(world_without_fraud: World) -> None:
    world = world_without_fraud
    await world.campaign()
    await world.affiliate("a1")
    for _ in range(2):
        await world.click("a1", ip="198.51.100.7")
    assert await world.db.fetchval("SELECT count(*) FROM clicks WHERE is_unique") == 2


async def test_made_up_affiliates_and_codes_count_under_empty_keys(world: World) -> None:
    """Unknown affiliate ids and unknown or mistyped codes add no rows of their own (issue #14)."""
    await world.campaign()
    await world.affiliate("a1", channel="social")
    await world.coupon("SAVE", usage_limit=100, allow_all_affiliates=True)
    t = world.clock.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    await world.click("a1", coupon_code="SAVE", occurred_at=ts(t + timedelta(minutes=1)))
    for n in range(3):
        await world.click(f"ghost{n}", occurred_at=ts(t + timedelta(minutes=2 + n)))
        await world.convert(order_id=f"X{n}", coupon_code=f"NOPE{n}", amount_micros=10_000_000,
                            occurred_at=ts(t + timedelta(minutes=10 + n)))
    # Both the rollups (a whole range) and the raw edges (an unaligned one) answer the same keys.
    for start, end in ((t, t + timedelta(hours=1)), (t + timedelta(seconds=30), t + timedelta(minutes=13))):
        by_affiliate = by_keys(await report(world, start, end, G.REPORT_GROUP_BY_AFFILIATE))
        assert {dict(k)["affiliate"]: v.get("clicks", 0) for k, v in by_affiliate.items()} == {"a1": 1, "": 3}
        by_coupon = by_keys(await report(world, start, end, G.REPORT_GROUP_BY_COUPON))
        assert {dict(k)["coupon"]: v.get("conversions", 0) for k, v in by_coupon.items()} == {"SAVE": 0, "": 3}
    await assert_no_drift(world, t - timedelta(days=1), t + timedelta(days=1))


async def test_a_click_keeps_its_affiliates_channel_after_the_affiliate_changes(world: World) -> None:
    await world.campaign()
    await world.affiliate("a1", channel="social")
    t = world.clock.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    await world.click("a1", occurred_at=ts(t + timedelta(minutes=1)))
    await world.db.execute("UPDATE affiliates SET channel = 'email' WHERE id = 'a1'")
    for start, end in ((t, t + timedelta(hours=1)), (t + timedelta(seconds=30), t + timedelta(minutes=5))):
        rows = by_keys(await report(world, start, end, G.REPORT_GROUP_BY_CHANNEL))
        assert {dict(k)["channel"]: v["clicks"] for k, v in rows.items()} == {"social": 1}
    await assert_no_drift(world, t - timedelta(days=1), t + timedelta(days=1))


async def test_rows_come_in_byte_order_whatever_the_servers_collation(world: World) -> None:
    """Keys sort byte by byte (COLLATE "C"), as Python sorts str: not by the database's collation.

    The embedded server and the machine's here are initialised with C-like
    locales; a server initialised with en_US.UTF-8 (common in production)
    sorts "_x" first and "a" before "B". The rollup's sub1 is given an ICU
    English collation here to stand for one (skipped where ICU is missing).
    """
    await world.campaign()
    await world.affiliate("a1", channel="social")
    t = world.clock.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    subs = ["b", "B", "a", "_x", "\u00c4", "a b", "10", "9"]
    for n, sub in enumerate(subs):
        await world.click("a1", sub1=sub, occurred_at=ts(t + timedelta(minutes=1 + n)))
    # rollups inside, raw edges at both ends
    for start, end in ((t, t + timedelta(hours=1)), (t + timedelta(seconds=30), t + timedelta(minutes=13))):
        rows = await report(world, start, end, G.REPORT_GROUP_BY_SUB1)
        assert [r.keys["sub1"] for r in rows] == sorted(subs)
    if not await world.db.fetchval("SELECT true FROM pg_collation WHERE collname = 'en-x-icu'"):
        pytest.skip("this PostgreSQL has no ICU collations")
    await world.db.execute('ALTER TABLE report_rollup ALTER COLUMN sub1 TYPE text COLLATE "en-x-icu"')
    for start, end in ((t, t + timedelta(hours=1)), (t + timedelta(seconds=30), t + timedelta(minutes=13))):
        rows = await report(world, start, end, G.REPORT_GROUP_BY_SUB1)
        assert [r.keys["sub1"] for r in rows] == sorted(subs)


async def test_a_reports_transaction_has_its_memory_no_jit_and_its_deadline(world: World) -> None:
    conn = world.db
    before = await conn.fetchval("SELECT current_setting('work_mem') || current_setting('jit')")
    async with conn.transaction(readonly=True):
        await report_store.settle(conn, work_mem="48MB", timeout_ms=1234)
        shown = await conn.fetchrow(
            "SELECT current_setting('work_mem') AS w, current_setting('jit') AS j,"
            " current_setting('statement_timeout') AS s"
        )
        assert shown is not None and tuple(shown) == ("48MB", "off", "1234ms")
    # SET LOCAL: a pooled connection gets its own settings back with the transaction's end
    assert await conn.fetchval("SELECT current_setting('work_mem') || current_setting('jit')") == before
