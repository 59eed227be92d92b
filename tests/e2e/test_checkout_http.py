"""GET /validate end to end, real processes: a shop server validating for a guesser and an honest shopper."""

from __future__ import annotations

from typing import Any

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.e2e.world import LiveWorld

pytestmark = pytest.mark.slow

THRESHOLD = 20  # ASCRIBE_FRAUD_GUESS_THRESHOLD's default


async def validate(live: LiveWorld, token: str, **params: str) -> tuple[int, dict[str, Any], str | None]:
    query = {"campaign_id": "cmp", "amount": "49.90", "currency": "EUR", **params}
    async with live.http.get(f"{live.url}/validate", params=query, headers={"X-Ascribe-Token": token}) as response:
        return response.status, await response.json(), response.headers.get("Retry-After")


async def test_a_guesser_is_refused_and_the_shop_s_honest_customer_is_not(live: LiveWorld) -> None:
    campaign = await live.setup_campaign()
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id="cmp", code="SUMMER150", usage_limit=150,
                                                allow_all_affiliates=True)),
        timeout=10,
    )
    token = campaign.postback_token
    assert await validate(live, token, coupon="summer150", ip="198.51.100.20") == (
        200, {"valid": True, "reasons": [], "remaining": 150}, None
    )
    assert (await validate(live, "wrong", coupon="SUMMER150"))[0] == 401

    answers = [await validate(live, token, coupon=f"GUESS{i:04d}", ip="203.0.113.99") for i in range(THRESHOLD + 30)]
    assert [status for status, _, _ in answers[:THRESHOLD]] == [200] * THRESHOLD
    assert all(body == {"valid": False, "reasons": ["unknown_coupon"]} for _, body, _ in answers[:THRESHOLD])
    refused = answers[THRESHOLD:]
    assert all(status == 429 and retry is not None and 1 <= int(retry) <= 600 for status, _, retry in refused)
    # The same shop server, another customer: never refused.
    for _ in range(10):
        status, body, _ = await validate(live, token, coupon="SUMMER150", ip="198.51.100.20")
        assert (status, body["valid"]) == (200, True)
    # No use was taken by any of it.
    coupon = await live.catalog.GetCoupon(pb.GetCouponRequest(campaign_id="cmp", code="SUMMER150"), timeout=10)
    assert coupon.used == 0
