"""GET /validate through the HTTP gateway, against real attribution, fraud, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from tests.integration.conversion_env import World
from tests.integration.test_gateway import GatewayFactory, json_error, make_gateway  # noqa: F401  (fixture)

THRESHOLD = 20


async def shop(world: World, make_gateway: GatewayFactory) -> TestClient[Any, Any]:  # noqa: F811
    return await make_gateway(f"127.0.0.1:{world.replicas[0].service.port}")


async def test_validate_answers_valid_reasons_and_remaining(
    world: World, make_gateway: GatewayFactory  # noqa: F811
) -> None:
    await world.campaign()
    await world.coupon("SUMMER10", allow_all_affiliates=True, usage_limit=150, min_order_micros=20_000_000)
    await world.coupon("OPEN", allow_all_affiliates=True)
    client = await shop(world, make_gateway)
    token = world.tokens["cmp"]
    query = {"campaign_id": "cmp", "coupon": "summer10", "amount": "49.90", "currency": "EUR", "customer_id": "c1"}
    response = await client.get("/validate", params=query, headers={"X-Ascribe-Token": token})
    assert response.status == 200, await response.text()
    assert await response.json() == {"valid": True, "reasons": [], "remaining": 150}
    small = await client.get("/validate", params={**query, "amount": "5.00", "token": token})
    assert await small.json() == {"valid": False, "reasons": ["below_min_order"], "remaining": 150}
    unlimited = await client.get("/validate", params={**query, "coupon": "OPEN", "token": token})
    assert await unlimited.json() == {"valid": True, "reasons": []}
    unknown = await client.get("/validate", params={**query, "coupon": "NOPE", "token": token})
    assert await unknown.json() == {"valid": False, "reasons": ["unknown_coupon"]}

    await json_error(await client.get("/validate", params=query), 401, "unauthenticated", "token")
    await json_error(
        await client.get("/validate", params=query, headers={"X-Ascribe-Token": "wrong"}), 401, "unauthenticated"
    )
    await json_error(
        await client.get("/validate", params={**query, "amount": "1e5", "token": token}), 400, "invalid_argument",
        "amount",
    )
    await json_error(
        await client.get("/validate", params={**query, "coupon": "no spaces!", "token": token}), 400,
        "invalid_argument", "coupon",
    )
    await json_error(
        await client.get("/validate", params={**query, "currency": "", "token": token}), 400, "invalid_argument",
        "currency",
    )
    await json_error(
        await client.get("/validate", params={**query, "campaign_id": "nope", "token": token}), 404, "not_found"
    )


async def test_a_guessing_address_gets_429_while_the_shop_s_other_customers_do_not(
    world: World, make_gateway: GatewayFactory  # noqa: F811
) -> None:
    """One shop server (one peer) validates for a guesser and an honest shopper, telling them apart by ip."""
    await world.campaign()
    await world.coupon("SUMMER10", allow_all_affiliates=True)
    client = await shop(world, make_gateway)
    base = {"campaign_id": "cmp", "amount": "49.90", "currency": "EUR", "token": world.tokens["cmp"]}
    statuses: list[int] = []
    honest: list[dict[str, Any]] = []

    async def guesser() -> None:
        for i in range(300):
            response = await client.get("/validate", params={**base, "coupon": f"GUESS{i:05d}", "ip": "203.0.113.5"})
            statuses.append(response.status)
            if response.status == 429:
                assert 1 <= int(response.headers["Retry-After"]) <= 600
                assert (await response.json())["error"]["code"] == "too_many_requests"

    async def shopper() -> None:
        for _ in range(60):
            response = await client.get("/validate", params={**base, "coupon": "SUMMER10", "ip": "198.51.100.8"})
            assert response.status == 200
            honest.append(await response.json())
            await asyncio.sleep(0.005)

    await asyncio.gather(guesser(), shopper())
    assert statuses[:THRESHOLD] == [200] * THRESHOLD
    assert statuses[THRESHOLD:] == [429] * (300 - THRESHOLD)
    assert all(answer == {"valid": True, "reasons": []} for answer in honest) and len(honest) == 60
