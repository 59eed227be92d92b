"""How the counters' script calls reach Redis: the RESP client, or redis-py on a cluster.

(Not the gRPC transport settings, which are ``services.common.channels.Transport``.)

Both do the same two things: load the script (and tell whether the server
is a cluster), and run a pipeline of EVALSHA calls in one round trip,
answering each call's reply or its error in its place. The store picks one
once, when it is made (``transport_for``), and logs which.

- ``RespTransport``: the minimal RESP client (``resp.py``) on one
  multiplexed connection. Standalone servers it can reach (TCP or a Unix
  socket, no TLS). A lone click check (bench case ``d.transport_*_1``)
  costs the caller about 50 µs of CPU through it against 115-140 µs through
  redis-py even with hiredis, and Redis 50-60 against 70-85 µs; at 100
  checks a call the two are within a few µs per check.
- ``RedisPyTransport``: redis-py, whose cluster pipeline sends each shard its
  calls (routed by each call's key, the bucket's tag), the shards in
  parallel: one round trip per shard. Also what a standalone server the
  RESP client cannot speak (TLS) is reached by. hiredis parses its replies.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import Unavailable
from services.fraud.resp import RespClient, RespConnectionError, RespError, RespTimeoutError

logger = logging.getLogger(__name__)

RedisClient = aioredis.Redis | aioredis.RedisCluster
# Redis failing us, as opposed to a bug of ours: answered UNAVAILABLE. A
# cluster adds its own (no reachable node, CLUSTERDOWN and READONLY during a
# failover); RedisClusterException is not a RedisError.
REDIS_DOWN = (RedisError, RedisClusterException, RespConnectionError, RespTimeoutError)


def redis_unavailable(error: Exception) -> Unavailable:
    logger.warning("redis unavailable: %s", error)
    return Unavailable("fraud state store (Redis) is unavailable")


class ScriptMissing(Exception):
    """The server does not hold the script (restarted or flushed): load it and call again."""


# One script call: the tag key that routes it, the key prefix, the operations.
Call = tuple[bytes, bytes, bytes]
# A call's reply, ScriptMissing, Unavailable (Redis failed that call), or another error reply.
Result = bytes | Exception


class RedisTransport(ABC):
    name: str

    @abstractmethod
    async def load(self, script: str) -> tuple[str, bool]:
        """Loads the script: its SHA1, and whether the server says it is standalone."""

    @abstractmethod
    async def evalsha(self, sha: str, calls: Sequence[Call]) -> list[Result]:
        """Runs the calls in one round trip (per shard); raises ``Unavailable`` when Redis is down."""

    @abstractmethod
    async def aclose(self) -> None:
        """Closes what the transport opened itself (not the redis-py client it was given)."""


class RespTransport(RedisTransport):
    name = "resp"

    def __init__(self, client: RespClient) -> None:
        self.client = client

    async def load(self, script: str) -> tuple[str, bool]:
        try:
            sha, info = await self.client.execute([("SCRIPT", "LOAD", script), ("INFO", "cluster")])
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        if isinstance(sha, RespError):
            logger.error("redis refused the fraud script: %s", sha.message)
            raise Unavailable("fraud state store (Redis) failed")
        # Only a server that says it is standalone gets one call per batch: an
        # error (INFO refused by an ACL) keeps the per-bucket calls, which are
        # right everywhere.
        return sha.decode(), isinstance(info, bytes) and b"cluster_enabled:0" in info

    async def evalsha(self, sha: str, calls: Sequence[Call]) -> list[Result]:
        try:
            replies = await self.client.execute(
                [("EVALSHA", sha, b"1", tag, prefix, ops) for tag, prefix, ops in calls]
            )
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        results: list[Result] = []
        for reply in replies:
            if isinstance(reply, RespError):
                results.append(ScriptMissing() if reply.code == "NOSCRIPT" else reply)
            else:
                results.append(reply)
        return results

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisPyTransport(RedisTransport):
    name = "redis-py"

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    async def load(self, script: str) -> tuple[str, bool]:
        try:
            sha = str(await self.client.script_load(script))
            try:
                standalone = (await self.client.info("cluster")).get("cluster_enabled") == 0
            except ResponseError:
                standalone = False
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        return sha, standalone

    async def evalsha(self, sha: str, calls: Sequence[Call]) -> list[Result]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for tag, prefix, ops in calls:
                    # execute_command, not evalsha(): redis-py's cluster
                    # pipeline refuses the method but routes the command by
                    # its key (the bucket's tag), which is what a script needs.
                    pipe.execute_command("EVALSHA", sha, 1, tag, prefix, ops)
                replies = await pipe.execute(raise_on_error=False)
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        results: list[Result] = []
        for reply in replies:
            if isinstance(reply, NoScriptError):
                results.append(ScriptMissing())
            elif isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                results.append(redis_unavailable(reply))
            else:
                results.append(reply)
        return results

    async def aclose(self) -> None:
        pass  # the client is the store's owner's, closed by it


def transport_for(client: RedisClient) -> RedisTransport:
    """The RESP client where it speaks the connection's protocol, else redis-py."""
    if isinstance(client, aioredis.Redis):
        resp = RespClient.like(client)
        if resp is not None:
            transport: RedisTransport = RespTransport(resp)
            logger.info("fraud counters: RESP client to a standalone Redis")
            return transport
        logger.info("fraud counters: redis-py (a connection the RESP client does not speak, such as TLS)")
        return RedisPyTransport(client)
    logger.info("fraud counters: redis-py cluster client")
    return RedisPyTransport(client)
