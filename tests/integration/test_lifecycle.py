"""After a conversion is recorded: refunds, review, approval, expiry, leaks.

Time is an injected clock (no sleeping tests); races are real concurrent
clients and several replicas on one database.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.integration.conversion_env import World, ts
from tests.support import bad_request_fields

PENDING = pb.CONVERSION_STATUS_PENDING
APPROVED = pb.CONVERSION_STATUS_APPROVED
REJECTED = pb.CONVERSION_STATUS_REJECTED
REVERSED = pb.CONVERSION_STATUS_REVERSED
FLAGGED = pb.CONVERSION_STATUS_FLAGGED


async def test_a_refund_frees_exactly_one_use_for_the_next_order(world: World) -> None:
    await world.campaign()
    await world.coupon("C150", usage_limit=150, allow_all_affiliates=True)
    taken = await asyncio.gather(*(world.convert(coupon_code="C150") for _ in range(150)))
    assert all(c.status == PENDING for c in taken)
    assert (await world.convert(coupon_code="C150")).reasons == ["usage_limit_reached"]
    refunded = await world.refund(taken[0].order_id)
    assert refunded.status == REVERSED
    assert await world.used("C150") == 149
    nxt = await world.convert(coupon_code="C150")
    assert nxt.status == PENDING and nxt.coupon_remaining == 0
    assert (await world.convert(coupon_code="C150")).status == REJECTED


async def test_concurrent_refunds_and_orders_keep_the_ledger_and_counter_equal(world: World) -> None:
    await world.add_replica()
    await world.campaign()
    await world.coupon("BUSY", usage_limit=100, allow_all_affiliates=True)
    taken = await asyncio.gather(*(world.convert(coupon_code="BUSY") for _ in range(100)))
    refunds = [world.refund(c.order_id) for c in taken[:50]]
    orders = [world.convert(replica=world.replicas[1], coupon_code="BUSY") for _ in range(50)]
    results = await asyncio.gather(*refunds, *orders)
    new_accepted = sum(1 for r in results[50:] if r.status != REJECTED)
    used = await world.used("BUSY")
    assert used == await world.live_ledger("BUSY")
    assert used == 50 + new_accepted
    holding = await world.db.fetchval(
        "SELECT count(*) FROM conversions WHERE coupon_code = 'BUSY' AND holds_coupon_use"
    )
    assert holding == used


async def test_refund_ids_amounts_and_states(world: World) -> None:
    await world.campaign("pct", payout_percent_bp=1000, payout_micros=0)
    await world.affiliate("A")
    click = await world.click("A", "pct")
    conversion = await world.convert(campaign_id="pct", click_id=click, amount_micros=100_000_000)
    assert conversion.payout_micros == 10_000_000

    partial = await world.refund(conversion.order_id, "pct", refund_id="r1", amount_micros=40_000_000)
    assert partial.status == PENDING
    assert partial.refunded_micros == 40_000_000 and partial.payout_micros == 6_000_000
    again = await world.refund(conversion.order_id, "pct", refund_id="r1", amount_micros=40_000_000)
    assert again.refunded_micros == 40_000_000  # idempotent on refund_id
    # ... and the retry answers what the first call answered, history included.
    assert [e.reason for e in again.history] == [e.reason for e in partial.history] == ["judged", "refund"]

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await world.refund(conversion.order_id, "pct", refund_id="r1", amount_micros=1_000_000)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as too_much:
        await world.refund(conversion.order_id, "pct", refund_id="r2", amount_micros=60_000_001)
    assert too_much.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount_micros" in bad_request_fields(too_much.value)

    full = await world.refund(conversion.order_id, "pct", refund_id="r2")
    assert full.status == REVERSED and full.refunded_micros == 100_000_000 and full.payout_micros == 0
    assert await world.db.fetchval("SELECT conversions FROM clicks WHERE click_id = $1", click) == 0
    repeated = await world.refund(conversion.order_id, "pct")  # a repeated full refund
    assert repeated.status == REVERSED and len(repeated.history) == 3
    with pytest.raises(grpc.aio.AioRpcError) as reversed_again:
        await world.refund(conversion.order_id, "pct", refund_id="r3", amount_micros=1)
    assert reversed_again.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    rejected = await world.convert(campaign_id="pct", coupon_code="NOSUCHCODE")
    with pytest.raises(grpc.aio.AioRpcError) as not_refundable:
        await world.refund(rejected.order_id, "pct")
    assert not_refundable.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await world.refund("no-such-order", "pct")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    history = (await world.get(conversion.order_id, "pct")).history
    assert [e.reason for e in history] == ["judged", "refund", "refund"]


async def test_unique_code_comes_back_only_when_the_campaign_says_so(world: World) -> None:
    await world.campaign("keep")
    await world.campaign("reuse", reuse_unique_after_refund=True)
    for campaign in ("keep", "reuse"):
        await world.coupon("PERSONAL1", campaign, kind=pb.COUPON_KIND_UNIQUE)
        first = await world.convert(campaign_id=campaign, coupon_code="PERSONAL1")
        await world.refund(first.order_id, campaign)
    assert (await world.get_coupon("PERSONAL1", "keep")).remaining == 0
    assert (await world.get_coupon("PERSONAL1", "reuse")).remaining == 1
    assert (await world.convert(campaign_id="reuse", coupon_code="PERSONAL1")).status == PENDING


async def test_review_approves_or_rejects_flagged_conversions(world: World) -> None:
    await world.campaign()
    await world.coupon("ONHOLD", usage_limit=5, allow_all_affiliates=True, status=pb.COUPON_STATUS_HOLD)
    one = await world.convert(coupon_code="ONHOLD")
    two = await world.convert(coupon_code="ONHOLD")
    assert one.status == FLAGGED and "coupon_on_hold" in one.reasons
    assert await world.used("ONHOLD") == 2  # held until a person decides
    queue = await world.tracking.ListConversions(
        pb.ListConversionsRequest(campaign_id="cmp", status=FLAGGED), timeout=10
    )
    assert {c.order_id for c in queue.conversions} == {one.order_id, two.order_id}

    approved = await world.tracking.ReviewConversion(
        pb.ReviewConversionRequest(campaign_id="cmp", order_id=one.order_id, approve=True, note="known buyer"),
        timeout=10,
    )
    assert approved.status == PENDING
    rejected = await world.tracking.ReviewConversion(
        pb.ReviewConversionRequest(campaign_id="cmp", order_id=two.order_id, approve=False, note="reseller"),
        timeout=10,
    )
    assert rejected.status == REJECTED and rejected.payout_micros == 0
    assert await world.used("ONHOLD") == 1
    history = (await world.get(two.order_id)).history
    assert history[-1].actor == "reviewer" and history[-1].note == "reseller"
    with pytest.raises(grpc.aio.AioRpcError) as not_flagged:
        await world.tracking.ReviewConversion(
            pb.ReviewConversionRequest(campaign_id="cmp", order_id=one.order_id, approve=True), timeout=10
        )
    assert not_flagged.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_approval_at_hold_until_exactly_once_across_replicas(world: World) -> None:
    await world.add_replica()
    await world.campaign(hold_days=1)
    conversions = await asyncio.gather(*(world.convert() for _ in range(30)))
    hold_until = max(c.hold_until.ToDatetime().replace(tzinfo=world.clock.now.tzinfo) for c in conversions)
    world.clock.now = hold_until - timedelta(microseconds=1)
    assert await world.replicas[0].service.lifecycle.approve_due() == 0
    world.clock.now = hold_until
    approved = 0
    for _ in range(20):  # a round may skip rows another replica holds: the job just runs again
        counts = await asyncio.gather(*(
            world.replicas[i % 2].service.lifecycle.approve_due(limit=7) for i in range(6)
        ))
        approved += sum(counts)
        if approved >= 30:
            break
    assert approved == 30
    assert await world.db.fetchval("SELECT count(*) FROM conversion_events WHERE reason = 'hold_passed'") == 30
    assert await world.db.fetchval("SELECT count(*) FROM conversions WHERE status = 'approved'") == 30


async def test_refund_racing_the_approval_job_ends_consistent(world: World) -> None:
    await world.campaign(hold_days=1)
    await world.coupon("RACE", usage_limit=100, allow_all_affiliates=True)
    conversions = await asyncio.gather(*(world.convert(coupon_code="RACE") for _ in range(40)))
    world.clock.advance(days=2)
    lifecycle = world.replicas[0].service.lifecycle
    await asyncio.gather(lifecycle.approve_due(limit=10), lifecycle.approve_due(limit=10),
                         *(world.refund(c.order_id) for c in conversions[:20]))
    await lifecycle.approve_due()
    statuses = await world.db.fetch("SELECT status, count(*) FROM conversions GROUP BY status")
    assert dict((r["status"], r["count"]) for r in statuses) == {"reversed": 20, "approved": 20}
    assert await world.used("RACE") == 20 == await world.live_ledger("RACE")


async def test_twelve_hour_personal_code(world: World) -> None:
    await world.campaign()
    await world.coupon(
        "CART-RECOVERY-1", kind=pb.COUPON_KIND_UNIQUE, assigned_customer_id="alice",
        valid_until=ts(world.clock.now + timedelta(hours=12)),
    )
    await world.coupon(
        "CART-RECOVERY-2", kind=pb.COUPON_KIND_UNIQUE, assigned_customer_id="bob",
        valid_until=ts(world.clock.now + timedelta(hours=12)),
    )
    other = await world.convert(coupon_code="CART-RECOVERY-1", customer_id="mallory")
    assert "customer_not_assigned" in other.reasons
    used = await world.convert(coupon_code="CART-RECOVERY-1", customer_id="alice")
    assert used.status == PENDING
    again = await world.convert(coupon_code="CART-RECOVERY-1", customer_id="alice")
    assert again.reasons == ["usage_limit_reached"]
    world.clock.advance(hours=12)
    late = await world.convert(coupon_code="CART-RECOVERY-2", customer_id="bob")
    assert late.status == REJECTED and "coupon_expired" in late.reasons


async def test_a_leaking_unique_code_is_put_on_hold(world: World) -> None:
    leak_watcher = await world.add_replica(background_jobs=True, auto_hold_leaked_codes=True)
    await world.campaign()
    await world.coupon("VIP-0001", kind=pb.COUPON_KIND_UNIQUE)
    for n in range(6):
        await world.convert(replica=leak_watcher, coupon_code="VIP-0001", ip=f"198.51.100.{10 + n}",
                            customer_id=f"c{n}")
    for _ in range(100):
        if (await world.get_coupon("VIP-0001")).status == pb.COUPON_STATUS_HOLD:
            break
        await asyncio.sleep(0.1)
    assert (await world.get_coupon("VIP-0001")).status == pb.COUPON_STATUS_HOLD
    event = await world.db.fetchrow("SELECT actor, to_status FROM coupon_events WHERE code = 'VIP-0001'")
    assert (event["actor"], event["to_status"]) == ("leak_response", "hold")
    assert await world.db.fetchval("SELECT after_id FROM alert_cursor WHERE name = 'leak_response'")


async def test_refunds_without_an_id_are_full_and_idempotent(world: World) -> None:
    await world.campaign(payout_percent_bp=1000, payout_micros=0)
    conversion = await world.convert(amount_micros=100_000_000)  # credited to nobody: no payout
    with pytest.raises(grpc.aio.AioRpcError) as partial:
        await world.refund(conversion.order_id, amount_micros=10_000_000)
    assert partial.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(partial.value) == ["refund_id"]
    partly = await world.refund(conversion.order_id, refund_id="r1", amount_micros=10_000_000)
    assert partly.payout_micros == 0  # nobody earns a payout from a partial refund either
    full = await world.refund(conversion.order_id, amount_micros=90_000_000)
    assert full.status == REVERSED
    again = await world.refund(conversion.order_id, amount_micros=90_000_000)
    assert again.status == REVERSED and again.refunded_micros == 100_000_000


async def test_pooled_connections_keep_utc_and_lose_open_transactions(world: World) -> None:
    """The pool's release skips asyncpg's RESET ALL round trip: start-up settings must hold."""
    pool = world.replicas[0].service.pool
    for _ in range(3):  # the same few connections, released and taken again
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW TimeZone") == "UTC"
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS left_open (x int)")
            await conn.execute("INSERT INTO left_open VALUES (1)")
            # Released with the transaction still open: asyncpg rolls it back.
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        # The table was created inside the abandoned transaction: gone with it.
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open') IS NULL")


async def test_the_leak_response_never_holds_an_exclusive_code(world: World) -> None:
    """An influencer's EXCLUSIVE code spreading far is its success, not a leak."""
    replica = world.replicas[0].service
    await world.campaign()
    await world.affiliate("influencer")
    await world.coupon("INFLUENCER", kind=pb.COUPON_KIND_EXCLUSIVE, affiliate_ids=["influencer"])
    await world.coupon("VIP-0002", kind=pb.COUPON_KIND_UNIQUE)
    lifecycle = replica.lifecycle
    assert not await lifecycle.hold_leaked_code("cmp", "INFLUENCER", "CODE_LEAK from the test")
    assert (await world.get_coupon("INFLUENCER")).status == pb.COUPON_STATUS_ACTIVE
    assert await lifecycle.hold_leaked_code("cmp", "VIP-0002", "CODE_LEAK from the test")
    assert (await world.get_coupon("VIP-0002")).status == pb.COUPON_STATUS_HOLD


async def test_a_refunds_answer_shows_the_codes_uses_left_now(world: World) -> None:
    await world.campaign()
    await world.coupon("LEFT", usage_limit=5, allow_all_affiliates=True)
    orders = [await world.convert(coupon_code="LEFT") for _ in range(3)]
    assert [c.coupon_remaining for c in orders] == [4, 3, 2]
    refunded = await world.refund(orders[0].order_id)
    assert refunded.coupon_remaining == 3  # 5 - 2 live uses, not the 4 left when it was recorded
    partial = await world.refund(orders[1].order_id, refund_id="r-2", amount_micros=1)
    assert partial.coupon_remaining == 3  # a partial refund keeps its use
    retried = await world.refund(orders[0].order_id)
    assert retried.coupon_remaining == 3
    assert (await world.get(orders[0].order_id)).coupon_remaining == 4  # the order's own record is unchanged
