"""ValidateCoupon against real PostgreSQL, Redis and fraud: reasons, no use taken, auth, the guessing guard."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import timedelta
from typing import Any

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.attribution.common import code_check
from services.attribution.metrics import CATALOG_LOOKUPS_TOTAL
from tests.integration.conversion_env import BROWSER_UA, World, ts
from tests.support import TEST_REPORTS, bad_request_fields

THRESHOLD = 20  # the fraud service's default ASCRIBE_FRAUD_GUESS_THRESHOLD


def validate_request(world: World, code: str, campaign_id: str = "cmp", **fields: Any) -> pb.ValidateCouponRequest:
    fields.setdefault("amount_micros", 50_000_000)
    fields.setdefault("currency", "EUR")
    fields.setdefault("postback_token", world.tokens.get(campaign_id, ""))
    return pb.ValidateCouponRequest(campaign_id=campaign_id, code=code, **fields)


async def validate(world: World, code: str, **fields: Any) -> pb.ValidateCouponResponse:
    return await world.catalog.ValidateCoupon(validate_request(world, code, **fields), timeout=10)


def retry_after(error: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.seconds)
    raise AssertionError("no RetryInfo in the status")


def lookups() -> float:
    """Catalog queries sent to PostgreSQL so far (the cache's misses, every kind)."""
    return sum(
        found.value
        for metric in CATALOG_LOOKUPS_TOTAL.collect()
        for found in metric.samples
        if found.name == "ascribe_catalog_lookups_total"
    )


async def test_a_good_code_is_valid_and_no_use_is_taken(world: World) -> None:
    await world.campaign()
    until = world.clock.now + timedelta(days=3)
    await world.coupon("SUMMER10", allow_all_affiliates=True, usage_limit=5, valid_until=ts(until))
    await world.coupon("OPEN", allow_all_affiliates=True)
    answer = await validate(world, "summer10")
    assert answer.valid and list(answer.reasons) == []
    assert answer.coupon.code == "SUMMER10" and answer.coupon.kind == pb.COUPON_KIND_GENERAL
    assert answer.coupon.HasField("remaining") and answer.coupon.remaining == 5
    assert answer.coupon.valid_until.ToSeconds() == int(until.timestamp())
    assert not answer.coupon.affiliate_ids  # only what a checkout shows
    assert await world.used("SUMMER10") == 0
    unlimited = await validate(world, "OPEN")
    assert unlimited.valid and not unlimited.coupon.HasField("remaining")


async def test_reasons_are_the_words_a_conversion_gets(world: World) -> None:
    await world.campaign()
    await world.coupon(
        "RULES", allow_all_affiliates=True, countries=["DE"], device_types=[pb.DEVICE_TYPE_MOBILE],
        skus=["SKU-1"], min_order_micros=100_000_000,
    )
    cart: dict[str, Any] = {
        "country": "FR", "device_type": pb.DEVICE_TYPE_DESKTOP, "skus": ["SKU-2"], "amount_micros": 10_000_000,
        "currency": "USD",
    }
    answer = await validate(world, "RULES", **cart)
    conversion = await world.convert(coupon_code="RULES", **cart)
    assert not answer.valid
    assert set(answer.reasons) == set(conversion.reasons) >= {
        "restriction_country", "restriction_device", "restriction_sku", "below_min_order", "currency_mismatch"
    }
    # The cart subtotal is before the discount: 100 meets a 100 minimum.
    good = await validate(world, "RULES", country="DE", device_type=pb.DEVICE_TYPE_MOBILE, skus=["sku-1"],
                          amount_micros=100_000_000)
    assert good.valid and list(good.reasons) == []


async def test_window_status_limits_and_customers(world: World) -> None:
    await world.campaign()
    now = world.clock.now
    await world.coupon("OLD", allow_all_affiliates=True, valid_until=ts(now - timedelta(days=1)))
    await world.coupon("LATER", allow_all_affiliates=True, valid_from=ts(now + timedelta(days=1)))
    await world.coupon("PAUSED", allow_all_affiliates=True, status=pb.COUPON_STATUS_PAUSED)
    await world.coupon("HELD", allow_all_affiliates=True, status=pb.COUPON_STATUS_HOLD)
    await world.coupon("ONCE", allow_all_affiliates=True, usage_limit=1)
    await world.coupon("PERCUST", allow_all_affiliates=True, per_customer_limit=1)
    await world.coupon("MINE", kind=pb.COUPON_KIND_UNIQUE, usage_limit=1, assigned_customer_id="alice")
    assert list((await validate(world, "OLD")).reasons) == ["coupon_expired"]
    assert list((await validate(world, "LATER")).reasons) == ["coupon_not_yet_valid"]
    assert list((await validate(world, "PAUSED")).reasons) == ["coupon_inactive"]
    held = await validate(world, "HELD")  # a conversion would be flagged, not rejected
    assert held.valid and list(held.reasons) == ["coupon_on_hold"]
    assert (await validate(world, "ONCE")).valid
    await world.convert(coupon_code="ONCE")
    once = await validate(world, "ONCE")
    assert not once.valid and list(once.reasons) == ["usage_limit_reached"] and once.coupon.remaining == 0
    assert list((await validate(world, "PERCUST")).reasons) == ["customer_id_required"]
    assert (await validate(world, "PERCUST", customer_id="bob")).valid
    await world.convert(coupon_code="PERCUST", customer_id="bob")
    assert list((await validate(world, "PERCUST", customer_id="bob")).reasons) == ["customer_limit_reached"]
    assert (await validate(world, "PERCUST", customer_id="carol")).valid
    assert list((await validate(world, "MINE", customer_id="bob")).reasons) == ["customer_not_assigned"]
    assert (await validate(world, "MINE", customer_id="alice")).valid


async def test_unknown_mistyped_and_affiliate_access(world: World) -> None:
    await world.campaign()
    await world.affiliate("ann")
    await world.affiliate("ben")
    await world.coupon("ANNONLY", affiliate_ids=["ann"])
    reply = await world.catalog.GenerateCodes(
        pb.GenerateCodesRequest(template=pb.Coupon(campaign_id="cmp", allow_all_affiliates=True), count=3,
                                prefix="VIP", length=8), timeout=30)
    codes = [c async for chunk in world.catalog.ExportCodes(pb.ExportCodesRequest(batch_id=reply.batch_id))
             for c in chunk.codes]
    code = codes[0]
    wrong_check = code[:-1] + next(s for s in code_check.ALPHABET if s != code[-1])
    assert list((await validate(world, "NOSUCH")).reasons) == ["unknown_coupon"]
    mistyped = await validate(world, wrong_check)
    assert list(mistyped.reasons) == ["coupon_mistyped"] and not mistyped.HasField("coupon")
    assert (await validate(world, code)).valid
    assert (await validate(world, "ANNONLY", affiliate_id="ann")).valid
    assert list((await validate(world, "ANNONLY", affiliate_id="ben")).reasons) == ["affiliate_not_allowed"]
    click_id = await world.click("ben")
    assert "affiliate_not_allowed" in (await validate(world, "ANNONLY", click_id=click_id)).reasons
    assert "unknown_click" in (await validate(world, "ANNONLY", click_id="nope")).reasons


async def test_tokens_and_bad_input(world: World) -> None:
    await world.campaign()
    await world.coupon("SUMMER10", allow_all_affiliates=True)
    guarded = await world.add_replica(admin_token="admin-secret")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.catalog.ValidateCoupon(validate_request(world, "SUMMER10", postback_token="wrong"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.catalog.ValidateCoupon(validate_request(world, "SUMMER10", postback_token=""), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    by_token = await guarded.catalog.ValidateCoupon(validate_request(world, "SUMMER10"), timeout=5)
    by_admin = await guarded.catalog.ValidateCoupon(
        validate_request(world, "SUMMER10", postback_token=""), timeout=5,
        metadata=(("authorization", "Bearer admin-secret"),),
    )
    assert by_token.valid and by_admin.valid
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # other admin RPCs still need the admin token
        await guarded.catalog.GetCoupon(pb.GetCouponRequest(campaign_id="cmp", code="SUMMER10"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.catalog.ValidateCoupon(
            validate_request(world, "bad code!", currency="euro", amount_micros=-1, ip="1.2.3", country="France"),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["code", "amount_micros", "currency", "country", "ip"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await validate(world, "SUMMER10", campaign_id="nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ten_thousand_guesses_are_refused_without_queries_and_the_honest_shopper_never_is(
    world: World,
) -> None:
    """One shop server (one gRPC channel, one peer) validates for a guesser and an honest shopper."""
    await world.campaign()
    honest_codes = ["SUMMER10", "WINTER20", "SPRING30"]
    for code in honest_codes:
        await world.coupon(code, allow_all_affiliates=True)
    guesser_ip, honest_ip = "203.0.113.66", "198.51.100.7"
    guesses = [f"G{secrets.token_hex(5).upper()}" for _ in range(10_000)]
    concurrency = 8
    refused: list[int] = []
    answered_guesses = 0
    honest_answers: list[pb.ValidateCouponResponse] = []
    before = lookups()

    async def guesser(worker: int) -> None:
        nonlocal answered_guesses
        for code in guesses[worker::concurrency]:
            try:
                answer = await validate(world, code, ip=guesser_ip)
                assert list(answer.reasons) == ["unknown_coupon"]
                answered_guesses += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused.append(retry_after(error))

    async def honest() -> None:
        for i in range(150):
            honest_answers.append(await validate(world, honest_codes[i % 3], ip=honest_ip, customer_id="c-1"))
            await asyncio.sleep(0.002)

    started = time.perf_counter()
    await asyncio.gather(honest(), *(guesser(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    guesser_queries = lookups() - before - 2 * len(honest_answers)  # an honest validation: campaign + code

    assert all(a.valid for a in honest_answers) and len(honest_answers) == 150
    assert THRESHOLD <= answered_guesses <= THRESHOLD + concurrency
    assert len(refused) == 10_000 - answered_guesses
    assert all(600 - elapsed - 2 <= seconds <= 600 for seconds in refused), (min(refused), max(refused))  # the window counts down
    # A guess that reaches the database costs the campaign, the code and the batch shapes.
    assert guesser_queries <= 3 * (THRESHOLD + concurrency)
    TEST_REPORTS.setdefault("code guessing", []).append(
        f"10,000 guesses from one address ({concurrency} in flight) beside 150 honest validations: "
        f"{answered_guesses} answered, {len(refused)} refused (429), {guesser_queries:.0f} catalog queries "
        f"for the guesser, in {elapsed:.1f} s"
    )

    # One alert for the address, however many guesses.
    async with grpc.aio.insecure_channel(world.fraud_addr) as channel:
        stub = fraud_pb2_grpc.FraudServiceStub(channel)
        alerts: list[fraud_pb2.Alert] = []
        call = stub.WatchAlerts(fraud_pb2.WatchAlertsRequest(after_id="0"), timeout=1.5)
        with pytest.raises(grpc.aio.AioRpcError):
            async for alert in call:
                alerts.append(alert)
    guessing = [a for a in alerts if a.kind == fraud_pb2.ALERT_KIND_CODE_GUESSING]
    assert len(guessing) == 1 and guessing[0].ip == guesser_ip and guessing[0].campaign_id == "cmp"

    # A sale from the guesser's address, with a real code, goes to a person.
    sale = await world.convert(coupon_code="SUMMER10", ip=guesser_ip, user_agent=BROWSER_UA)
    assert "fraud_code_guessing" in sale.reasons and sale.status == pb.CONVERSION_STATUS_FLAGGED
    honest_sale = await world.convert(coupon_code="SUMMER10", ip=honest_ip, user_agent=BROWSER_UA)
    assert "fraud_code_guessing" not in honest_sale.reasons


async def test_unknown_codes_on_clicks_and_conversions_count_too(world: World) -> None:
    await world.campaign()
    await world.affiliate("ann")
    ip = "192.0.2.9"
    for i in range(THRESHOLD - 2):
        await world.click("ann", coupon_code=f"CLICKGUESS{i}", ip=ip)
    for i in range(2):
        await world.convert(coupon_code=f"SALEGUESS{i}", ip=ip)
    # Conversions report their misses in the background: the guard learns within moments.
    deadline = time.monotonic() + 5
    while True:
        try:
            await validate(world, "ANYTHING", ip=ip)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            break
        assert time.monotonic() < deadline, "the address was never refused"
        await asyncio.sleep(0.05)


async def test_fraud_down_validation_fails_open_within_the_deadline(world_without_fraud: World) -> None:
    await world_without_fraud.campaign()
    started = time.perf_counter()
    for i in range(THRESHOLD + 5):
        answer = await validate(world_without_fraud, f"NOPE{i}", ip="203.0.113.1")
        assert list(answer.reasons) == ["unknown_coupon"]
    assert time.perf_counter() - started < (THRESHOLD + 5) * 0.2


async def test_a_batch_answers_each_entry_as_if_alone(world: World) -> None:
    await world.campaign()
    await world.coupon("SUMMER10", allow_all_affiliates=True)
    for i in range(THRESHOLD):
        await validate(world, f"NOPE{i}", ip="203.0.113.77")
    answer = await world.catalog.ValidateCouponBatch(
        pb.ValidateCouponBatchRequest(requests=[
            validate_request(world, "SUMMER10", ip="198.51.100.2"),
            validate_request(world, "SUMMER10", currency="euro"),
            validate_request(world, "SUMMER10", ip="203.0.113.77"),
            validate_request(world, "SUMMER10", postback_token="wrong"),
        ]),
        timeout=10,
    )
    good, bad, blocked, refused = answer.results
    assert good.response.valid
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad.error.field == "currency"
    assert blocked.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert 590 <= blocked.retry_after_seconds <= 600
    assert refused.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
