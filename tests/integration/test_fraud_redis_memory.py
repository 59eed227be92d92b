"""The Redis memory gauges (AscribeRedisMemoryHigh) read from a real Redis, standalone and clustered."""

from __future__ import annotations

import redis as redis_sync
import redis.asyncio as aioredis

from services.common import embedded
from services.fraud import metrics
from services.fraud.redis_memory import poll_once
from tests.integration.test_fraud_cluster import cluster  # noqa: F401  (fixture)
from tests.support import sample


async def test_the_gauges_follow_info_memory(redis_client: aioredis.Redis) -> None:
    used, limit = await poll_once(redis_client)
    info = await redis_client.info("memory")
    assert limit == int(info["maxmemory"])
    assert 0 < used <= int(info["used_memory_peak"])
    assert (sample(metrics.REDIS_USED_MEMORY_BYTES), sample(metrics.REDIS_MAXMEMORY_BYTES)) == (used, limit)


async def test_a_cluster_reports_its_fullest_node(cluster: list[embedded.EmbeddedServer]) -> None:  # noqa: F811
    # One node bounded close above what it holds: it is the fullest, whatever the others hold.
    with redis_sync.Redis(port=cluster[1].port) as node:
        held = int(node.info("memory")["used_memory"])
        configured = node.config_get("maxmemory")["maxmemory"]
        node.config_set("maxmemory", held + 64 * 1024 * 1024)
        client = aioredis.RedisCluster.from_url(cluster[0].url)
        try:
            used, limit = await poll_once(client)
        finally:
            node.config_set("maxmemory", configured)
            await client.aclose()
    assert limit == held + 64 * 1024 * 1024
    assert abs(used - held) < 16 * 1024 * 1024
    assert sample(metrics.REDIS_MAXMEMORY_BYTES) == limit
