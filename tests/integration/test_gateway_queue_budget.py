"""The gateway's queue budget, end to end in-process: a click that cannot start in time is a 503 and is never sent.

The real attribution service and PostgreSQL; the gateway with a 1 ms budget
and a 200 ms linger, so clicks that arrive while a batch is in flight wait
longer than the budget: they are answered 503 with Retry-After, counted as
shed, and none of them reaches the database (every row is a 302's).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc

from gateway.metrics import SHED_TOTAL
from services.attribution.server import AttributionService
from tests.integration.test_gateway import (
    GatewayFactory,
    attribution,
    channel,
    create_affiliate,
    create_campaign,
    make_gateway,
)

__all__ = ["attribution", "channel", "make_gateway"]  # the fixtures, shared


async def test_clicks_over_the_queue_budget_are_503_with_retry_after_and_never_recorded(
    attribution: AttributionService, channel: grpc.aio.Channel, make_gateway: GatewayFactory, database_url: str,
) -> None:
    campaign = await create_campaign(channel)
    affiliate = await create_affiliate(channel)
    gateway = await make_gateway(
        f"127.0.0.1:{attribution.port}", queue_budget_ms=1, click_linger_ms=200, click_stream=False
    )
    shed_before = SHED_TOTAL.labels("queue")._value.get()

    async def click(n: int) -> tuple[int, str | None, Any]:
        async with gateway.get(
            "/click", params={"campaign_id": campaign.id, "aff_id": affiliate.id, "sub1": f"q{n}"},
            allow_redirects=False,
        ) as response:
            body = await response.json() if response.status == 503 else None
            return response.status, response.headers.get("Retry-After"), body

    answers = []
    for round_ in range(3):
        # A click after a quiet spell goes at once; those 30 ms later must wait
        # for the linger (200 ms after it), past the 1 ms budget.
        first = asyncio.create_task(click(100 * round_))
        await asyncio.sleep(0.03)
        answers += await asyncio.gather(*(click(100 * round_ + n) for n in range(1, 11)))
        answers.append(await first)
        await asyncio.sleep(0.25)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {302, 503}, statuses
    assert statuses.count(302) >= 1 and statuses.count(503) >= 1, statuses
    for status, retry_after, body in answers:
        if status == 503:
            assert retry_after == "1"
            assert body["error"]["code"] == "unavailable"
    assert SHED_TOTAL.labels("queue")._value.get() - shed_before == statuses.count(503)
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM clicks WHERE campaign_id = $1", campaign.id)
    finally:
        await conn.close()
    assert stored == statuses.count(302), "a shed click was recorded (or an acknowledged one lost)"
