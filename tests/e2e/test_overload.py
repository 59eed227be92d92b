"""Overload, end to end: every click and postback is answered in bounded time, nothing acknowledged is lost.

The three services as real processes, the gateway with a small connection
cap and queue budget so this machine can overload it with a few hundred
connections: each client connection sends clicks one after another for a
few seconds (a closed loop, as wrk does). Every request must get an answer
within the bound: a 302 (recorded) or a 503 with ``Retry-After`` (shed,
never recorded); none may time out or be reset. Then every 302's click id
must be in PostgreSQL, as must every 200 postback's conversion (a few
postback connections run beside the clicks). (The same at wrk's 4,000 and 10,000 connections is
the bench's case, bench/overload.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from tools.stack import Stack

CONNECTIONS = 400
SHOPS = 20  # postback connections beside the visitors'
CAP = 120
SECONDS = 4.0
# No answer may take longer than this (wrk's --timeout in the goal).
ANSWER_BOUND_S = 5.0


async def test_under_overload_every_request_is_answered_in_time_and_nothing_acknowledged_is_lost(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
) -> None:
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path,
        env={
            "ASCRIBE_IPINTEL_DIR": str(ipintel_dir),
            "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
            "ASCRIBE_GATEWAY_MAX_CONNECTIONS": str(CAP),
            "ASCRIBE_GATEWAY_QUEUE_BUDGET_MS": "100",
        },
    )
    await asyncio.to_thread(stack.start)
    try:
        async with grpc.aio.insecure_channel(stack.addr("attribution")) as channel:
            catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
            campaign = await catalog.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(
                id="overload", name="Overload", landing_url="https://shop.example/o",
                currency="EUR", payout_micros=1_000_000,
            )), timeout=10)
            affiliate = await catalog.CreateAffiliate(
                pb.CreateAffiliateRequest(affiliate=pb.Affiliate(name="aff", channel="social")), timeout=10
            )
        url = f"{stack.gateway_url}/click?campaign_id={campaign.id}&aff_id={affiliate.id}"
        statuses: Counter[str] = Counter()
        acknowledged: list[str] = []
        conversions: list[str] = []
        slowest = 0.0
        async with aiohttp.ClientSession() as first, first.get(url, allow_redirects=False) as reply:
            assert reply.status == 302
            click_id = reply.headers["X-Ascribe-Click-Id"]
            acknowledged.append(click_id)
        end = time.monotonic() + SECONDS

        async def shop(session: aiohttp.ClientSession, n: int) -> None:
            """Postbacks beside the clicks: each 200 must be a stored conversion."""
            nonlocal slowest
            i = 0
            while time.monotonic() < end:
                i += 1
                began = time.monotonic()
                try:
                    async with session.post(
                        f"{stack.gateway_url}/postback",
                        params={"campaign_id": campaign.id, "order_id": f"o-{n}-{i}", "amount": "10.00",
                                "currency": "EUR", "click_id": click_id},
                        headers={"X-Ascribe-Token": campaign.postback_token},
                    ) as reply:
                        outcome = f"postback {reply.status}"
                        if reply.status == 200:
                            conversions.append((await reply.json())["id"])
                        elif reply.status == 503:
                            await reply.read()
                            outcome += " retry-after" if reply.headers.get("Retry-After") == "1" else " bare"
                except (aiohttp.ClientError, TimeoutError) as error:
                    outcome = type(error).__name__
                slowest = max(slowest, time.monotonic() - began)
                statuses[outcome] += 1

        async def visitor(session: aiohttp.ClientSession, n: int) -> None:
            nonlocal slowest
            i = 0
            while time.monotonic() < end:
                i += 1
                began = time.monotonic()
                try:
                    async with session.get(
                        url, allow_redirects=False,
                        headers={"X-Forwarded-For": f"198.51.{n % 250}.{i % 250 + 1}"},
                    ) as reply:
                        await reply.read()
                        outcome = str(reply.status)
                        if reply.status == 302:
                            acknowledged.append(reply.headers["X-Ascribe-Click-Id"])
                        elif reply.status == 503:
                            outcome += " retry-after" if reply.headers.get("Retry-After") == "1" else " bare"
                except (aiohttp.ClientError, TimeoutError) as error:
                    outcome = type(error).__name__
                slowest = max(slowest, time.monotonic() - began)
                statuses[outcome] += 1

        timeout = aiohttp.ClientTimeout(total=ANSWER_BOUND_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            # The shops connect first: the cap is on connections, whatever they carry,
            # and a click flood that took every slot would leave postbacks only 503s.
            shops = [asyncio.create_task(shop(session, n)) for n in range(SHOPS)]
            await asyncio.sleep(0.3)
            await asyncio.gather(*(visitor(session, n) for n in range(CONNECTIONS)), *shops)

        assert set(statuses) <= {"302", "503 retry-after", "postback 200", "postback 503 retry-after"}, statuses
        assert statuses["postback 200"] > 0, f"no postback served: {statuses}"
        assert statuses["503 retry-after"] > 0, f"no overload reached: {statuses}"
        assert statuses["302"] > 0, f"nothing served: {statuses}"
        assert slowest < ANSWER_BOUND_S

        # Every acknowledged click is in PostgreSQL (the click writer may still be flushing).
        conn: Any = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 10
            while True:
                stored = await conn.fetchval(
                    "SELECT count(*) FROM clicks WHERE click_id = ANY($1::text[])", acknowledged
                )
                if stored == len(acknowledged) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            stored_conversions = await conn.fetchval(
                "SELECT count(*) FROM conversions WHERE id = ANY($1::text[])", conversions
            )
        finally:
            await conn.close()
        assert stored == len(acknowledged), f"{len(acknowledged) - stored} acknowledged clicks lost"
        assert stored_conversions == len(conversions), "acknowledged conversions lost"
    finally:
        await asyncio.to_thread(stack.stop)
