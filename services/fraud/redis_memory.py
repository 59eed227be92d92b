"""How full Redis is, for the memory alert (AscribeRedisMemoryHigh).

Redis runs with ``maxmemory`` and ``noeviction`` (README, "Redis memory"): at
the limit its writes fail, the fraud service answers UNAVAILABLE and events
are flagged ``fraud_unavailable``, never lost. Nothing is dropped silently,
so the only warning before that is this gauge: INFO memory, polled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from redis.asyncio.cluster import RedisCluster

from services.fraud import metrics

logger = logging.getLogger(__name__)

POLL_SECONDS = 15.0  # the alert looks at minutes: a scrape interval is plenty
POLL_TIMEOUT_SECONDS = 2.0


def fullest(info: Mapping[str, Any]) -> tuple[int, int]:
    """(used_memory, maxmemory) of the node nearest its limit.

    ``info`` is one server's INFO memory, or a cluster's answer: one such
    mapping per node. A node without a limit (maxmemory 0) counts as empty
    unless every node is unbounded, when the largest is reported.
    """
    nodes = [info] if "used_memory" in info else [v for v in info.values() if isinstance(v, Mapping)]
    if not nodes:
        raise ValueError("INFO memory without used_memory")
    pairs = [(int(n["used_memory"]), int(n.get("maxmemory", 0))) for n in nodes]
    bounded = [p for p in pairs if p[1] > 0]
    if bounded:
        return max(bounded, key=lambda p: p[0] / p[1])
    return max(pairs)


async def poll_once(client: Any) -> tuple[int, int]:
    """Reads INFO memory (every node of a cluster) and sets the gauges."""
    if isinstance(client, RedisCluster):
        # Primaries only: replicas ignore maxmemory by default.
        answer = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    else:
        answer = await client.info("memory")
    used, limit = fullest(answer)
    metrics.REDIS_USED_MEMORY_BYTES.set(used)
    metrics.REDIS_MAXMEMORY_BYTES.set(limit)
    return used, limit


async def watch(client: Any, every: float = POLL_SECONDS) -> None:
    """Polls until cancelled; a Redis that does not answer leaves the last reading.

    The first failure after a success is a warning (INFO may be refused by an
    ACL or a proxy: then the alert cannot fire), and so is the recovery.
    """
    failing = False
    while True:
        try:
            await asyncio.wait_for(poll_once(client), POLL_TIMEOUT_SECONDS)
            if failing:
                logger.warning("Redis memory readable again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a failed reading must not end the watch
            if not failing:
                logger.warning("Redis memory not read (AscribeRedisMemoryHigh cannot fire meanwhile): %s", error)
            failing = True
        await asyncio.sleep(every)
