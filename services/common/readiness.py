"""gRPC health that tells the truth: readiness follows a dependency, liveness only the process.

A service's own names (and the server-wide name "") are SERVING only while
its dependency answers a fresh probe; the name ``liveness`` stays SERVING for
as long as the process serves at all, so a supervisor or a kubelet liveness
probe never restarts a healthy process because its database is down.

The probes open a fresh connection each time, bounded by ``PROBE_TIMEOUT``: a
stopped PostgreSQL postmaster still answers on connections already pooled,
and only a new one shows that nobody can connect any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import asyncpg
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2

from services.common.tasks import raise_if_cancelling

logger = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"
# Twice a second, each probe bounded by one second: a dependency that stops
# answering shows within 1.5 s, one that answers again within 0.5 s (the
# contract allows 2 s each way; measured 1.1-1.4 s and 0.2-0.3 s). A fresh
# PostgreSQL session costs the server about a millisecond of CPU, so no
# more often than that.
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Probe = Callable[[], Awaitable[None]]


def postgres_probe(database_url: str, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Connects afresh and runs ``SELECT 1``, all within ``timeout``."""

    async def probe() -> None:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(database_url, timeout=timeout)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                # A graceful close, so PostgreSQL does not log a lost client twice a second.
                try:
                    await conn.close(timeout=timeout)
                except BaseException:
                    conn.terminate()
                    raise

    return probe


def redis_probe(redis_url: str, *, cluster: bool = False, timeout: float = PROBE_TIMEOUT) -> Probe:
    """PING on a fresh connection: LOADING (a Redis replaying its file), refused or silent all fail."""

    async def probe() -> None:
        client: aioredis.Redis | aioredis.RedisCluster
        if cluster:
            client = aioredis.RedisCluster.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            client = aioredis.Redis.from_url(
                redis_url, single_connection_client=True, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        try:
            async with asyncio.timeout(timeout):
                await client.ping()
        finally:
            await client.aclose()

    return probe


async def first_attempt(
    step: Probe, unavailable: tuple[type[BaseException], ...], dependency: str
) -> Probe | None:
    """Runs a start-up ``step`` that needs the dependency; returns it, to run later, when the dependency is down.

    A process restarted while its database is down must still come up (live,
    not ready) rather than exit and be restarted in a loop; any other error
    is a real start-up failure and propagates.
    """
    try:
        await step()
    except unavailable as error:
        logger.warning("%s is unavailable at start-up (%s); not ready until it answers", dependency, error)
        return step
    return None


class Readiness:
    """Keeps ``names`` of a health servicer in step with what ``probe`` says about a dependency.

    ``prepare``, when given, is a start-up step that could not run yet (see
    `first_attempt`): each check retries it until it succeeds once, and the
    service is not ready before.
    """

    def __init__(
        self,
        health_servicer: health.aio.HealthServicer,
        names: Iterable[str],
        probe: Probe,
        dependency: str,
        *,
        interval: float = PROBE_INTERVAL,
        prepare: Probe | None = None,
    ) -> None:
        self._health = health_servicer
        self._names = ["", *(name for name in names if name)]
        self._probe = probe
        self._dependency = dependency
        self._interval = interval
        self._prepare = prepare
        self.ready: bool | None = None

    async def mark(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in self._names:
            await self._health.set(name, status)

    async def check(self) -> bool:
        """One probe; sets the health names when the answer changed."""
        try:
            if self._prepare is not None:
                await self._prepare()
                self._prepare = None
            await self._probe()
            ready, why = True, ""
        except Exception as error:  # any failure of the probe means "unusable"
            ready, why = False, f"{type(error).__name__}: {error}".rstrip(": ")
        if ready != self.ready:
            await self.mark(SERVING if ready else NOT_SERVING)
            if ready:
                logger.info("%s answers: ready", self._dependency)
            else:
                logger.warning("%s is unusable (%s): not ready until it answers", self._dependency, why)
            self.ready = ready
        return ready

    async def run(self) -> None:
        """Probes every ``interval``; a probe that hangs for its whole timeout is followed at once."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.check()
            raise_if_cancelling()  # redis-py's connect and close can swallow it
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))


async def follow_dependency(
    health_servicer: health.aio.HealthServicer,
    names: Iterable[str],
    probe: Probe,
    dependency: str,
    *,
    interval: float = PROBE_INTERVAL,
    prepare: Probe | None = None,
) -> asyncio.Task[None]:
    """Marks the process live, probes once, then keeps probing in a task the caller cancels on stop."""
    await health_servicer.set(LIVENESS_SERVICE, SERVING)
    readiness = Readiness(health_servicer, names, probe, dependency, interval=interval, prepare=prepare)
    # The server started SERVING; until the first probe answers (a hung
    # dependency takes its whole timeout, a deferred step longer) we do not know.
    await readiness.mark(NOT_SERVING)
    await readiness.check()
    return asyncio.create_task(readiness.run(), name=f"readiness of {dependency}")
