"""Conversions against real PostgreSQL, Redis, fraud and attribution services.

Races are real: many concurrent gRPC clients, and several attribution
replicas sharing one database where the claim is about replicas.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from prometheus_client import REGISTRY

from services.attribution.migrate import migrate_url
from services.common import embedded
from tests.integration.conversion_env import FraudHandle, World, start_fraud_service, ts
from tests.support import Clock, bad_request_fields

PENDING = pb.CONVERSION_STATUS_PENDING
APPROVED = pb.CONVERSION_STATUS_APPROVED
REJECTED = pb.CONVERSION_STATUS_REJECTED
FLAGGED = pb.CONVERSION_STATUS_FLAGGED
CLICK = pb.ATTRIBUTION_SOURCE_CLICK
COUPON = pb.ATTRIBUTION_SOURCE_COUPON
NONE = pb.ATTRIBUTION_SOURCE_NONE


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fraud_checks() -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "ascribe_fraud_verdicts":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_seed_coupon_accepts_the_last_second_and_rejects_the_end_instant(world: World) -> None:
    world.clock.now = utc("2025-09-25T00:00:30Z")
    await world.campaign()
    await world.affiliate("aff-a")
    await world.coupon(
        "SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
        valid_from=ts(utc("2025-06-26T00:00:00Z")), valid_until=ts(utc("2025-09-25T00:00:00Z")),
    )
    inside = await world.convert(coupon_code="summer150", occurred_at=ts(utc("2025-09-24T23:59:59Z")))
    assert inside.status == PENDING, inside.reasons
    assert inside.coupon_remaining == 149
    # One selected affiliate and no click: there is no doubt whose code it is.
    assert (inside.source, inside.affiliate_id) == (COUPON, "aff-a")
    outside = await world.convert(coupon_code="SUMMER150", occurred_at=ts(utc("2025-09-25T00:00:00Z")))
    assert outside.status == REJECTED
    assert "coupon_expired" in outside.reasons
    assert (await world.get_coupon("SUMMER150")).remaining == 149


async def test_one_order_posted_20_times_at_once_is_one_conversion_one_use_one_check(world: World) -> None:
    await world.campaign()
    await world.coupon("HOT", usage_limit=10, allow_all_affiliates=True)
    request = world.request(order_id="o-1", coupon_code="HOT", customer_id="c1")
    checks_before = fraud_checks()
    results = await asyncio.gather(
        *(world.tracking.RecordConversion(request, timeout=20) for _ in range(20))
    )
    assert {r.id for r in results} == {results[0].id}
    assert results[0].status == PENDING
    assert await world.used("HOT") == 1
    assert await world.live_ledger("HOT") == 1
    assert await world.db.fetchval("SELECT count(*) FROM conversions") == 1
    assert await world.db.fetchval("SELECT count(*) FROM conversion_events") == 1
    assert fraud_checks() - checks_before == 1

    again = await world.tracking.RecordConversion(request, timeout=10)
    assert again.id == results[0].id
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await world.convert(order_id="o-1", coupon_code="HOT", customer_id="c1", amount_micros=1)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await world.used("HOT") == 1


async def test_an_order_rejected_for_a_fixable_reason_is_judged_anew(world: World) -> None:
    await world.campaign()
    await world.coupon("ONCE", per_customer_limit=1, allow_all_affiliates=True)
    first = await world.convert(order_id="o-7", coupon_code="ONCE")
    assert first.status == REJECTED and "customer_id_required" in first.reasons
    fixed = await world.convert(order_id="o-7", coupon_code="ONCE", customer_id="c-7")
    assert fixed.status == PENDING and fixed.id == first.id
    history = (await world.get("o-7")).history
    assert [(e.from_status, e.to_status) for e in history] == [
        (pb.CONVERSION_STATUS_UNSPECIFIED, REJECTED), (REJECTED, PENDING)
    ]
    assert "customer_id_required" in history[0].note


async def test_per_customer_limit_holds_under_a_race(world: World) -> None:
    await world.campaign()
    await world.coupon("WELCOME", per_customer_limit=1, allow_all_affiliates=True)
    results = await asyncio.gather(
        *(world.convert(coupon_code="WELCOME", customer_id="same") for _ in range(20))
    )
    accepted = [r for r in results if r.status != REJECTED]
    assert len(accepted) == 1
    assert all("customer_limit_reached" in r.reasons for r in results if r.status == REJECTED)
    assert await world.used("WELCOME") == 1


async def test_usage_limit_is_exact_across_three_replicas(world: World) -> None:
    await world.add_replica()
    await world.add_replica()
    await world.campaign()
    await world.coupon("LIMITED", usage_limit=150, allow_all_affiliates=True)
    results = await asyncio.gather(*(
        world.convert(replica=world.replicas[i % 3], coupon_code="LIMITED", customer_id=f"c{i}")
        for i in range(450)
    ))
    accepted = [r for r in results if r.status != REJECTED]
    assert len(accepted) == 150
    assert sorted(r.coupon_remaining for r in accepted) == list(range(150))
    assert all(r.reasons == ["usage_limit_reached"] for r in results if r.status == REJECTED)
    assert await world.used("LIMITED") == 150
    assert await world.live_ledger("LIMITED") == 150


async def test_credit_table(world: World) -> None:
    await world.campaign("cmp")
    await world.campaign("cf", attribution_policy=pb.ATTRIBUTION_POLICY_CLICK_FIRST)
    await world.affiliate("A", channel="social")
    await world.affiliate("B", channel="influencer")
    for campaign in ("cmp", "cf"):
        await world.coupon("GEN", campaign, allow_all_affiliates=True)
        await world.coupon("GENSEL", campaign, affiliate_ids=["A"])
        await world.coupon("GENTWO", campaign, affiliate_ids=["A", "B"])
        await world.coupon("EXCL", campaign, kind=pb.COUPON_KIND_EXCLUSIVE, affiliate_ids=["B"])
        for n in range(3):
            await world.coupon(f"UNIQB{n}", campaign, kind=pb.COUPON_KIND_UNIQUE, affiliate_ids=["B"])
        await world.coupon("UNIQFREE", campaign, kind=pb.COUPON_KIND_UNIQUE)

    async def outcome(campaign: str, code: str, clicker: str | None) -> tuple[str, int, list[str]]:
        click_id = await world.click(clicker, campaign) if clicker else ""
        conversion = await world.convert(campaign_id=campaign, coupon_code=code, click_id=click_id)
        if conversion.status == REJECTED:
            return ("rejected", NONE, list(conversion.reasons))
        return (conversion.affiliate_id, conversion.source, [])

    for campaign in ("cmp", "cf"):
        assert await outcome(campaign, "", "A") == ("A", CLICK, [])
        assert await outcome(campaign, "", None) == ("", NONE, [])
        assert await outcome(campaign, "GEN", "A") == ("A", CLICK, [])
        assert await outcome(campaign, "GENSEL", "A") == ("A", CLICK, [])
        rejected = await outcome(campaign, "GENSEL", "B")
        assert rejected[0] == "rejected" and "affiliate_not_allowed" in rejected[2]
        assert await outcome(campaign, "GEN", None) == ("", NONE, [])
        assert await outcome(campaign, "GENSEL", None) == ("A", COUPON, [])
        assert await outcome(campaign, "GENTWO", None) == ("", NONE, [])
        assert await outcome(campaign, "EXCL", "B") == ("B", CLICK, [])
        assert await outcome(campaign, "EXCL", None) == ("B", COUPON, [])
        assert await outcome(campaign, "UNIQB0", None) == ("B", COUPON, [])
        assert await outcome(campaign, "UNIQFREE", "A") == ("A", CLICK, [])
    # Where a click and a code disagree, the policy decides.
    assert await outcome("cmp", "EXCL", "A") == ("B", COUPON, [])
    assert await outcome("cf", "EXCL", "A") == ("A", CLICK, [])
    assert await outcome("cmp", "UNIQB1", "A") == ("B", COUPON, [])
    assert await outcome("cf", "UNIQB1", "A") == ("A", CLICK, [])
    assert (await world.get_coupon("UNIQB1", "cf")).remaining == 0  # the code is still used


async def test_a_click_earns_one_conversion_by_default(world: World) -> None:
    await world.campaign()
    await world.affiliate("A")
    click_id = await world.click("A")
    first = await world.convert(click_id=click_id)
    second = await world.convert(click_id=click_id)
    assert (first.affiliate_id, first.source) == ("A", CLICK)
    assert second.status == PENDING and second.source == NONE
    assert "click_already_converted" in second.reasons
    unknown = await world.convert(click_id="not-a-click-id")
    assert unknown.status == PENDING and "unknown_click" in unknown.reasons


async def test_hold_runs_from_the_later_time_and_zero_days_approve_at_once(world: World) -> None:
    await world.campaign("held", hold_days=30, payout_percent_bp=1000, payout_micros=0)
    await world.campaign("instant", hold_days=0)
    await world.affiliate("A")
    backdated = world.clock.now - timedelta(days=3)
    click_id = await world.click("A", "held", occurred_at=ts(backdated - timedelta(hours=1)))
    held = await world.convert(campaign_id="held", click_id=click_id, occurred_at=ts(backdated))
    assert held.status == PENDING
    assert held.hold_until.ToDatetime(tzinfo=UTC) == world.clock.now + timedelta(days=30)
    assert held.payout_micros == 5_000_000  # 10 % of 50.00
    instant = await world.convert(campaign_id="instant")
    assert instant.status == APPROVED


async def test_restrictions_and_static_rules_are_all_listed(world: World) -> None:
    await world.campaign()
    await world.affiliate("A", channel="email")
    await world.coupon(
        "RULES", allow_all_affiliates=True, countries=["DE"], device_types=[pb.DEVICE_TYPE_MOBILE],
        channels=["social"], skus=["SKU-1"], min_order_micros=100_000_000,
    )
    click_id = await world.click("A")
    conversion = await world.convert(
        coupon_code="RULES", click_id=click_id, country="FR", device_type=pb.DEVICE_TYPE_DESKTOP,
        skus=["SKU-2"], amount_micros=10_000_000, currency="USD",
    )
    assert conversion.status == REJECTED
    for reason in ("restriction_country", "restriction_device", "restriction_channel", "restriction_sku",
                   "below_min_order", "currency_mismatch"):
        assert reason in conversion.reasons
    good = await world.convert(
        coupon_code="RULES", country="DE", device_type=pb.DEVICE_TYPE_MOBILE, skus=["sku-1", "x"],
        amount_micros=90_000_000, discount_micros=10_000_000,
    )
    assert "restriction_channel" in good.reasons  # no click: the channel is "direct"


async def test_bad_postbacks_get_clear_errors(world: World) -> None:
    await world.campaign()
    cases = {
        "amount_micros": {"amount_micros": -1},
        "currency": {"currency": "EURO"},
        "order_id": {"order_id": ""},
        "coupon_code": {"coupon_code": "no spaces!"},
        "ip": {"ip": "999.1.1.1"},
        "occurred_at": {"occurred_at": ts(world.clock.now + timedelta(minutes=6))},
    }
    for field, fields in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await world.convert(**fields)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in bad_request_fields(error.value)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await world.convert(postback_token="wrong")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await world.convert(campaign_id="nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await world.db.fetchval("SELECT count(*) FROM conversions") == 0


async def test_batch_judges_each_conversion_alone(world: World) -> None:
    await world.campaign()
    await world.coupon("TWO", usage_limit=2, allow_all_affiliates=True)
    requests = [world.request(coupon_code="TWO") for _ in range(3)] + [world.request(amount_micros=-5)]
    answer = await world.tracking.RecordConversionBatch(
        pb.RecordConversionBatchRequest(requests=requests), timeout=20
    )
    statuses = [r.conversion.status for r in answer.responses[:3]]
    assert statuses.count(PENDING) == 2 and statuses.count(REJECTED) == 1
    assert answer.responses[3].WhichOneof("result") == "error"
    assert answer.responses[3].error.field == "amount_micros"


async def test_fraud_down_flags_then_rescoring_clears(world_without_fraud: World, redis_server_url: str,
                                                      redis_prefix: str, ipintel_dir: object) -> None:
    world = world_without_fraud
    await world.campaign()
    await world.coupon("SAFE", usage_limit=5, allow_all_affiliates=True)
    flagged = await world.convert(coupon_code="SAFE")
    assert flagged.status == FLAGGED and "fraud_unavailable" in flagged.reasons
    assert (await world.get_coupon("SAFE")).used == 1  # the use is held, never lost
    port = int(world.fraud_addr.rsplit(":", 1)[1])
    fraud = await start_fraud_service(redis_server_url, redis_prefix, Path(str(ipintel_dir)), port)
    try:
        changed = 0
        for _ in range(50):  # the channel reconnects with a short backoff
            changed = await world.replicas[0].service.lifecycle.rescore()
            if changed:
                break
            await asyncio.sleep(0.1)
        assert changed == 1
        after = await world.get(flagged.order_id)
        assert after.status == PENDING
        assert "fraud_unavailable" not in after.reasons
        assert after.history[-1].reason == "rescored"
    finally:
        await fraud.stop()


async def test_an_outage_backlog_is_rescored_in_rounds(world_without_fraud: World, redis_server_url: str,
                                                   redis_prefix: str, ipintel_dir: object) -> None:
    """Many rounds in one job run; rejections give their uses back; a person's decision is kept."""
    world = world_without_fraud
    await world.campaign()
    await world.coupon("BACKLOG", usage_limit=1000, allow_all_affiliates=True)
    spoof = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    requests = [world.request(coupon_code="BACKLOG") for _ in range(440)]
    requests += [world.request(coupon_code="BACKLOG", ip="198.51.100.30", user_agent=spoof) for _ in range(10)]
    for start in range(0, len(requests), 150):
        answer = await world.tracking.RecordConversionBatch(
            pb.RecordConversionBatchRequest(requests=requests[start:start + 150]), timeout=30
        )
        assert {r.conversion.status for r in answer.responses} == {FLAGGED}
    reviewed = requests[0].order_id
    await world.tracking.ReviewConversion(
        pb.ReviewConversionRequest(campaign_id="cmp", order_id=reviewed, approve=True, note="known buyer"), timeout=10
    )
    port = int(world.fraud_addr.rsplit(":", 1)[1])
    fraud = await start_fraud_service(redis_server_url, redis_prefix, Path(str(ipintel_dir)), port)
    try:
        lifecycle = world.replicas[0].service.lifecycle
        changed = 0
        for _ in range(50):  # the channel reconnects with a short backoff
            changed += await lifecycle.rescore(round_size=64)  # 7 rounds
            if changed >= 449:
                break
            await asyncio.sleep(0.1)
        assert changed == 449
    finally:
        await fraud.stop()
    statuses = dict(await world.db.fetch("SELECT status, count(*) FROM conversions GROUP BY status"))
    assert statuses == {"pending": 440, "rejected": 10}  # the reviewed one is in its hold too
    assert await world.db.fetchval("SELECT count(*) FROM conversions WHERE needs_rescore") == 0
    assert await world.used("BACKLOG") == 440 == await world.live_ledger("BACKLOG")
    rejected = await world.get(requests[-1].order_id)
    assert "fraud_crawler_spoof" in rejected.reasons and "fraud_unavailable" not in rejected.reasons
    assert rejected.history[-1].reason == "rescored"
    kept = await world.get(reviewed)
    assert kept.status == PENDING and all(event.reason != "rescored" for event in kept.history)


async def test_recording_needs_the_internal_token_and_reading_the_admin_token(world: World) -> None:
    await world.campaign()
    guarded = await world.add_replica(internal_token="internal-secret", admin_token="admin-secret")
    request = world.request(order_id="guarded-1")
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "Bearer admin-secret"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await guarded.tracking.RecordConversion(request, metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    recorded = await guarded.tracking.RecordConversion(
        request, metadata=(("authorization", "Bearer internal-secret"),), timeout=10
    )
    read = pb.GetConversionRequest(campaign_id="cmp", order_id="guarded-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await guarded.tracking.GetConversion(read, metadata=(("authorization", "Bearer internal-secret"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    got = await guarded.tracking.GetConversion(read, metadata=(("authorization", "Bearer admin-secret"),))
    assert got.id == recorded.id


async def test_postgres_down_answers_unavailable_and_writes_nothing_half(
    tmp_path: Path, fraud_service: FraudHandle
) -> None:
    """A database that goes away: a bounded wait, UNAVAILABLE, and a clean recovery."""
    server = embedded.start_postgres(tmp_path / "pg")
    try:
        await migrate_url(server.url)
        conn = await asyncpg.connect(server.url)
        world = World(server.url, conn, Clock(datetime.now(UTC)), fraud_service.addr)
        await world.add_replica(db_statement_timeout_ms=2000)
        try:
            await world.campaign()
            await world.coupon("DOWN", usage_limit=10, allow_all_affiliates=True)
            assert (await world.convert(coupon_code="DOWN")).status == PENDING
            await conn.close()
            server.stop()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await world.convert(order_id="while-down", coupon_code="DOWN")
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 15
            server = embedded.start_postgres(tmp_path / "pg", port=server.port)
            world.db = conn = await asyncpg.connect(server.url)
            recovered = None
            for _ in range(50):
                try:
                    recovered = await world.convert(order_id="after", coupon_code="DOWN")
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.2)
            assert recovered is not None and recovered.status == PENDING
            assert await world.used("DOWN") == 2 == await world.live_ledger("DOWN")
            assert await conn.fetchval("SELECT count(*) FROM conversions WHERE order_id = 'while-down'") == 0
        finally:
            await world.close()
            await conn.close()
    finally:
        server.stop()


async def test_a_value_postgres_cannot_store_fails_only_its_own_request(world: World) -> None:
    await world.campaign()
    good = world.request(order_id="good-1")
    bad = world.request(order_id="bad-1", user_agent="Mozilla\x00/5.0")
    far = world.request(order_id="far-1")
    far.occurred_at.seconds = 253_402_300_800  # year 10000
    answer = await world.tracking.RecordConversionBatch(
        pb.RecordConversionBatchRequest(requests=[good, bad, far]), timeout=20
    )
    assert answer.responses[0].conversion.status == PENDING
    assert answer.responses[1].error.field == "user_agent"
    assert answer.responses[2].error.field == "occurred_at"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await world.tracking.RecordConversion(world.request(customer_id="a\x00b"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error.value) == ["customer_id"]


async def test_a_copy_with_the_stored_content_is_answered_even_beside_a_conflicting_one(world: World) -> None:
    await world.campaign()
    stored = await world.convert(order_id="twin", amount_micros=10_000_000)
    other = world.request(order_id="twin", amount_micros=20_000_000)
    same = world.request(order_id="twin", amount_micros=10_000_000)
    answer = await world.tracking.RecordConversionBatch(
        pb.RecordConversionBatchRequest(requests=[other, same]), timeout=20
    )
    assert answer.responses[0].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert answer.responses[1].conversion.id == stored.id


async def test_a_click_slot_freed_by_a_late_rejection_goes_to_the_next_order(world: World) -> None:
    await world.campaign()
    await world.affiliate("A")
    await world.coupon("LASTONE", usage_limit=1, allow_all_affiliates=True)
    await world.convert(coupon_code="LASTONE")  # the code's only use
    click_id = await world.click("A")
    over_limit = world.request(click_id=click_id, coupon_code="LASTONE")
    plain = world.request(click_id=click_id)
    answer = await world.tracking.RecordConversionBatch(
        pb.RecordConversionBatchRequest(requests=[over_limit, plain]), timeout=20
    )
    first, second = (r.conversion for r in answer.responses)
    assert first.status == REJECTED and "usage_limit_reached" in first.reasons
    assert (second.affiliate_id, second.source) == ("A", CLICK)
    assert await world.db.fetchval("SELECT conversions FROM clicks WHERE click_id = $1", click_id) == 1


async def test_the_locked_read_sees_what_the_lock_holder_committed(world: World) -> None:
    """Migration 004: the read after the order locks uses a snapshot taken after them."""
    from services.attribution.conversions import store

    await world.campaign()
    await world.coupon("LOCKREAD", allow_all_affiliates=True)
    recorded = await world.convert(coupon_code="LOCKREAD")
    assert recorded.status == PENDING
    key = ("cmp", recorded.order_id)
    holder = await asyncpg.connect(world.database_url)
    reader = await asyncpg.connect(world.database_url)
    try:
        holding = holder.transaction()
        await holding.start()
        await store.lock_orders(holder, [key])
        read_tx = reader.transaction()
        await read_tx.start()
        waiting = asyncio.ensure_future(store.lock_and_fetch_orders(reader, [key]))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the read must wait for the order's lock"
        await holder.execute(
            "UPDATE conversions SET status = 'approved' WHERE campaign_id = $1 AND order_id = $2", *key
        )
        await holding.commit()
        found = await asyncio.wait_for(waiting, timeout=10)
        assert found[key].status == "approved", "read with a snapshot from before the lock was granted"
        await read_tx.rollback()
    finally:
        await holder.close()
        await reader.close()


async def test_a_coupon_restricted_to_a_long_sku_redeems_with_it(world: World) -> None:
    """Coupons once took 256-character SKUs that postbacks refused past 128 bytes."""
    sku = "S" * 200
    await world.campaign()
    await world.coupon("LONGSKU", allow_all_affiliates=True, skus=[sku])
    conversion = await world.convert(coupon_code="LONGSKU", skus=["other", sku])
    assert conversion.status != REJECTED, conversion.reasons
    assert "restriction_sku" not in conversion.reasons
    assert (await world.get_coupon("LONGSKU")).used == 1


async def test_a_code_of_one_selected_affiliate_credits_it_without_a_click(world: World) -> None:
    await world.campaign()
    await world.affiliate("A", channel="social")
    await world.affiliate("B", channel="social")
    await world.coupon("SOLO", affiliate_ids=["A"], channels=["social"])
    await world.coupon("PAIR", affiliate_ids=["A", "B"], channels=["social"])
    solo = await world.convert(coupon_code="SOLO")
    assert (solo.affiliate_id, solo.source, solo.status) == ("A", COUPON, PENDING), solo.reasons
    # Its channel rule sees A's channel, not "direct".
    assert "restriction_channel" not in solo.reasons
    pair = await world.convert(coupon_code="PAIR")
    assert (pair.affiliate_id, pair.source) == ("", pb.ATTRIBUTION_SOURCE_NONE)
    assert "restriction_channel" in pair.reasons  # credited to nobody: the channel is "direct"


async def test_a_postbacks_country_and_device_come_from_what_was_sent_else_its_ip_and_ua_else_its_click(
    world: World,
) -> None:
    await world.campaign()
    await world.affiliate("A")
    await world.coupon("DEONLY", allow_all_affiliates=True, countries=["DE"], device_types=[pb.DEVICE_TYPE_MOBILE])
    iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
    derived = await world.convert(coupon_code="DEONLY", ip="87.160.0.1", user_agent=iphone)
    assert "restriction_country" not in derived.reasons and "restriction_device" not in derived.reasons
    elsewhere = await world.convert(coupon_code="DEONLY", ip="8.8.8.8", user_agent=iphone)
    assert "restriction_country" in elsewhere.reasons
    sent = await world.convert(coupon_code="DEONLY", ip="8.8.8.8", country="DE", device_type=pb.DEVICE_TYPE_MOBILE)
    assert "restriction_country" not in sent.reasons and "restriction_device" not in sent.reasons
    click_id = await world.click("A", ip="87.160.0.2", user_agent=iphone)
    from_click = await world.convert(coupon_code="DEONLY", click_id=click_id)
    assert "restriction_country" not in from_click.reasons and "restriction_device" not in from_click.reasons
    nothing = await world.convert(coupon_code="DEONLY")
    assert "restriction_country" in nothing.reasons  # an order's unknown country fails a country rule
