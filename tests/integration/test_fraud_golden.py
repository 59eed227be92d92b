"""Every transport and way of grouping a batch reproduces the recorded story exactly.

See ``fraud_golden.py``: the answers and the stored keys of a fixed story of
checks, recorded before the counters became one class each.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from services.fraud.redis_transport import RedisPyTransport, RedisTransport, RespTransport
from services.fraud.resp import RespClient
from services.fraud.store import FraudStore
from tests.integration import fraud_golden


def transport(name: str, client: aioredis.Redis) -> RedisTransport:
    if name == "resp":
        resp = RespClient.like(client)
        assert resp is not None
        return RespTransport(resp)
    return RedisPyTransport(client)


@pytest.mark.parametrize("single_call", [True, False], ids=["one-call", "per-bucket"])
@pytest.mark.parametrize("name", ["resp", "redis-py"])
async def test_the_story_answers_and_stores_what_was_recorded(
    name: str, single_call: bool, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    client = aioredis.from_url(redis_server_url)
    config = replace(fraud_golden.CONFIG, prefix=redis_prefix, single_call_when_standalone=single_call)
    store = FraudStore(client, config, transport(name, client))
    try:
        await store.load_scripts()
        assert store._single_call is single_call
        got = await fraud_golden.run(store, redis_client)
    finally:
        await store.aclose()
        await client.aclose()
    # Through JSON, as recorded (tuples become lists).
    got = json.loads(json.dumps(got))
    want = json.loads(fraud_golden.GOLDEN.read_text())
    assert got["keys"] == want["keys"]
    for step, (mine, recorded) in enumerate(zip(got["answers"], want["answers"], strict=True)):
        assert mine == recorded, f"step {step}"
