"""A fixed story of fraud checks whose every answer and stored key is recorded.

``tests/integration/golden/fraud_store.json`` holds what the store answered
and left in Redis for this story, recorded from the store as it was before
its counters became one class each; every transport and way of grouping a
batch must reproduce it exactly. A deliberate change of what a counter
answers or stores (its representation lives in its class) re-records it:

    PYTHONPATH=.:gen .venv/bin/python -m tests.integration.fraud_golden
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from services.fraud.domain import ClickEvent, ConversionEvent, CouponKind
from services.fraud.store import FraudStore, StoreConfig
from tests.integration.test_fraud_store_modes import NOW, clicks, conversions

GOLDEN = Path(__file__).parent / "golden" / "fraud_store.json"
# Low minimum volumes, so that the story's few dozen events raise every kind of alert.
CONFIG = StoreConfig(burst_min_volume=20, surge_min_volume=10, spike_min_volume=20)


def _record(counters: Any, alerts: Any) -> dict[str, Any]:
    return {"counters": [asdict(c) for c in counters], "alerts": [asdict(a) for a in alerts]}


def _later_clicks(at: timedelta) -> list[ClickEvent]:
    # Same IPs and affiliates later on: the windows roll over (previous bucket, elapsed fraction).
    return [replace(e, click_id=f"{e.click_id}-{at.seconds}", occurred_at=NOW + at) for e in clicks(9)]


def _odd_conversions() -> list[ConversionEvent]:
    """IPv6 subscribers (one /64), an order without an id, and a code's fourth device."""
    base = conversions(0)[0]
    return [
        replace(base, order_id="v6-1", ip="2001:db8:1:2::1", coupon_code="SOLO", coupon_kind=CouponKind.UNIQUE),
        replace(base, order_id="v6-2", ip="2001:db8:1:2::99", coupon_code="SOLO", coupon_kind=CouponKind.UNIQUE,
                user_agent="curl/8.0"),
        replace(base, order_id="", ip="2001:db8:1:2::5", coupon_code="", coupon_kind=CouponKind.GENERAL),
        replace(base, order_id="", ip="2001:db8:1:2::5", coupon_code="", coupon_kind=CouponKind.GENERAL),
    ]


async def story(store: FraudStore) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for round_ in range(3):
        steps.append(_record(*await store.count_clicks(clicks(round_))))
        steps.append(_record(*await store.count_conversions(conversions(round_))))
    # A retried batch: each order answers its own count as it was, and adds nothing.
    steps.append(_record(*await store.count_conversions(conversions(1))))
    for later in (timedelta(seconds=75), timedelta(minutes=50), timedelta(hours=2, seconds=5)):
        steps.append(_record(*await store.count_clicks(_later_clicks(later))))
    steps.append(_record(*await store.count_conversions(_odd_conversions())))
    steps.append(_record(*await store.count_conversions(_odd_conversions())))
    day_later = [replace(e, received_at=NOW + timedelta(days=1, hours=1)) for e in conversions(5)]
    steps.append(_record(*await store.count_conversions(day_later)))
    for minutes in (0, 1, 7):
        alerts = await store.count_signals({"bot_user_agent": 12, "tor_exit": 3}, NOW + timedelta(minutes=minutes))
        steps.append(_record([], alerts))
    return steps


def text(value: bytes | str) -> str:
    """Bytes as text; binary ones (the unique visitors' fields) as 0x and their hex."""
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "0x" + value.hex()


async def stored(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key the story left (without the store's prefix): its type and content, and that it expires."""
    found: dict[str, Any] = {}
    async for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        name = text(raw)[len(prefix):]
        kind = text(await client.type(raw))
        content: Any
        if name.endswith((":ips", ":devices")):
            content = await client.pfcount(raw)  # HyperLogLog: its count, not its encoding
        elif kind == "hash":
            content = {text(k): text(v) for k, v in (await client.hgetall(raw)).items()}
        else:
            content = text(await client.get(raw) or b"")
        found[name] = {"type": kind, "content": content, "expires": await client.pttl(raw) > 0}
    return dict(sorted(found.items()))


async def run(store: FraudStore, client: aioredis.Redis) -> dict[str, Any]:
    return {"answers": await story(store), "keys": await stored(client, store.config.prefix)}


async def _record_golden() -> None:
    url = os.environ.get("ASCRIBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"golden{secrets.token_hex(4)}"
    client = aioredis.from_url(url)
    store = FraudStore(aioredis.from_url(url), replace(CONFIG, prefix=prefix))
    try:
        result = await run(store, client)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await store.aclose()
        await store.client.aclose()
        await client.aclose()
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(result['answers'])} steps and {len(result['keys'])} keys in {GOLDEN}")


if __name__ == "__main__":
    asyncio.run(_record_golden())
