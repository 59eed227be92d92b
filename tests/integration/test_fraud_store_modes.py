"""The fraud store's two ways of running a batch give the same answers and keys.

On a standalone Redis a batch is one script call for all its operations; on a
cluster it is one script call per bucket (hash tag). Both run here against the
same real server, each in a key space of its own, and must agree exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from services.fraud.domain import ClickEvent, ConversionEvent, CouponKind
from services.fraud.store import FraudStore, StoreConfig

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def clicks(round_: int) -> list[ClickEvent]:
    events = []
    for i in range(40):
        events.append(ClickEvent(
            click_id=f"c{round_}-{i}",
            # Every fifth external id repeats the previous round's: a duplicate.
            external_click_id=f"x{i}" if i % 5 == 0 else f"x{round_}-{i}",
            campaign_id="camp",
            affiliate_id=f"aff{i % 3}",
            coupon_code="",
            ip=f"203.0.113.{i % 7}",  # shared IPs: counted together within the batch
            user_agent="Mozilla/5.0",
            occurred_at=NOW + timedelta(seconds=round_),
        ))
    return events


def conversions(round_: int) -> list[ConversionEvent]:
    return [
        ConversionEvent(
            order_id=f"o{round_}-{i}", campaign_id="camp", affiliate_id="aff0", click_id="", click_time=None,
            coupon_code=f"CODE{i % 4}", coupon_kind=CouponKind.EXCLUSIVE if i % 2 else CouponKind.UNIQUE,
            customer_id=f"cust{i}", ip=f"198.51.100.{i % 9}", user_agent="Mozilla/5.0",
            occurred_at=NOW, received_at=NOW,
        )
        for i in range(30)
    ]


@pytest.fixture
async def stores(
    redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[FraudStore, FraudStore]]:
    # Both prefixes start with the test's own, so the fixture removes their keys.
    single = FraudStore(aioredis.from_url(redis_server_url), StoreConfig(prefix=f"{redis_prefix}a"))
    per_bucket = FraudStore(
        aioredis.from_url(redis_server_url),
        StoreConfig(prefix=f"{redis_prefix}b", single_call_when_standalone=False),
    )
    await single.load_scripts()
    await per_bucket.load_scripts()
    yield single, per_bucket
    for store in (single, per_bucket):
        await store.aclose()
        await store.client.aclose()


async def keys_of(client: aioredis.Redis, prefix: str) -> dict[str, int]:
    """Key names without the store's prefix, each with its type's first letter."""
    found = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        name = key.decode()
        found[name[len(prefix):]] = (await client.type(key)).decode()
    return found


async def test_one_call_per_batch_and_one_per_bucket_agree(
    stores: tuple[FraudStore, FraudStore], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    single, per_bucket = stores
    assert single._single_call, "a standalone server should take the one-call path"
    assert not per_bucket._single_call
    for round_ in range(3):
        single_clicks = await single.count_clicks(clicks(round_))
        bucket_clicks = await per_bucket.count_clicks(clicks(round_))
        assert single_clicks == bucket_clicks
        single_conversions = await single.count_conversions(conversions(round_))
        bucket_conversions = await per_bucket.count_conversions(conversions(round_))
        assert single_conversions == bucket_conversions
    counters, _ = single_clicks
    assert sum(1 for c in counters if c.duplicate_of) == 8, "the repeated external ids are duplicates"
    assert max(c.ip_last_minute for c in counters) >= 17, "an IP's clicks of three rounds are counted"
    single_keys = await keys_of(redis_client, f"{redis_prefix}a")
    assert single_keys == await keys_of(redis_client, f"{redis_prefix}b")
    # The keys keep their bucket hash tags either way (what a cluster routes on).
    assert single_keys and all(name.startswith(":fraud:{b") for name in single_keys)
    assert len({name[:12] for name in single_keys}) > 1, "the keys spread over several buckets"


async def test_a_forgotten_script_is_loaded_again_and_counts_once(
    stores: tuple[FraudStore, FraudStore], redis_client: aioredis.Redis
) -> None:
    single, _ = stores
    first, _ = await single.count_clicks(clicks(0))
    await redis_client.script_flush()
    again, _ = await single.count_clicks([replace(e, click_id=f"{e.click_id}-new") for e in clicks(0)])
    # Same external ids, new clicks: each is a duplicate of its first owner.
    assert [c.duplicate_of for c in again] == [e.click_id for e in clicks(0)]
    # Each IP's window counted the batch once, not once per attempt.
    assert max(c.ip_last_minute for c in again) == 2 * max(c.ip_last_minute for c in first) == 12
