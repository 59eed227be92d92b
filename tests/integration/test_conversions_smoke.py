from __future__ import annotations

from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.integration.conversion_env import World


async def test_smoke(world: World) -> None:
    await world.campaign()
    await world.affiliate("aff-a")
    await world.coupon("SUMMER10", usage_limit=2, allow_all_affiliates=True)
    c = await world.convert(coupon_code="summer10", customer_id="cu1")
    print(c)
    assert c.status == pb.CONVERSION_STATUS_PENDING, c
    assert c.coupon_remaining == 1
