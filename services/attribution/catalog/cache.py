"""The catalog as the hot paths (clicks, conversions) read it: through a cache.

The queries themselves are the catalog store's (``catalog.store.find_*``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import asyncpg

from services.attribution.catalog.store import find_affiliate, find_campaign, find_code_shapes, find_coupon
from services.attribution.common.code_check import CodeShape
from services.attribution.common.database import Connection, Executor
from services.attribution.common.models import Affiliate, Campaign, Coupon
from services.attribution.metrics import CATALOG_LOOKUPS_TOTAL

T = TypeVar("T")


def _count(key: tuple[str, ...]) -> None:
    CATALOG_LOOKUPS_TOTAL.labels(key[0]).inc()


class CatalogCache:
    """A short-lived cache of campaigns, affiliates and coupons for hot paths.

    Several replicas cannot invalidate each other's caches, so entries simply
    expire after ``ttl_seconds`` (0 disables caching): a change made by a
    person takes effect everywhere within about that time. No use is ever
    taken on a cached counter: the redemption's locked UPDATE reads the row.
    Click tracking does read the cached ``remaining`` (a code that ran out
    moments ago may still start tracking; its conversion is judged on the row).

    On a hot path an expiring entry must not send every concurrent request to
    PostgreSQL at once: one lookup per key is in flight at a time, and while
    it runs the others keep the value that just expired.

    Code inside a transaction passes its own connection (``conn``): taking a
    second connection from the pool while holding one could exhaust the pool
    and deadlock it under load.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = 1.0, max_entries: int = 100_000) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._max = max_entries
        self._entries: dict[tuple[str, ...], tuple[float, object]] = {}
        self._loading: dict[tuple[str, ...], asyncio.Future[Any]] = {}

    async def _lookup(
        self,
        key: tuple[str, ...],
        load: Callable[[Executor], Awaitable[T | None]],
        conn: Connection | None,
    ) -> T | None:
        if self._ttl <= 0:
            _count(key)
            return await load(conn or self._pool)
        entry = self._entries.get(key)
        if entry is not None and (entry[0] > time.monotonic() or key in self._loading):
            return cast(T | None, entry[1])
        if conn is not None:
            _count(key)
            value = await load(conn)
            self._put(key, value)
            return value
        loading = self._loading.get(key)
        if loading is None:
            # The load runs as a task of its own: a caller whose deadline
            # passes cancels only its own wait, never the others'.
            _count(key)
            loading = asyncio.ensure_future(load(self._pool))
            self._loading[key] = loading
            loading.add_done_callback(lambda task: self._loaded(key, task))
        return cast(T | None, await asyncio.shield(loading))

    def _loaded(self, key: tuple[str, ...], task: asyncio.Future[object]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._put(key, task.result())

    def _put(self, key: tuple[str, ...], value: object) -> None:
        if len(self._entries) >= self._max:
            # Drop the oldest tenth (dicts keep insertion order), not all of it,
            # so a large batch of codes does not make every hot entry miss.
            for old in list(itertools.islice(self._entries, self._max // 10 or 1)):
                del self._entries[old]
        self._entries[key] = (time.monotonic() + self._ttl, value)

    async def campaign(self, campaign_id: str, conn: Connection | None = None) -> Campaign | None:
        return await self._lookup(("campaign", campaign_id), lambda c: find_campaign(c, campaign_id), conn)

    async def affiliate(self, affiliate_id: str, conn: Connection | None = None) -> Affiliate | None:
        return await self._lookup(("affiliate", affiliate_id), lambda c: find_affiliate(c, affiliate_id), conn)

    async def coupon(
        self, campaign_id: str, code: str, conn: Connection | None = None
    ) -> Coupon | None:
        return await self._lookup(
            ("coupon", campaign_id, code), lambda c: find_coupon(c, campaign_id, code), conn
        )

    async def code_shapes(self, campaign_id: str, conn: Connection | None = None) -> tuple[CodeShape, ...]:
        """The shapes of the campaign's generated batches (read only for codes it does not have).

        A campaign has a handful of batches, so one small entry per campaign
        tells every mistyped code from an unknown one until it expires; a
        batch generated moments ago is recognized within the cache's TTL.
        """
        shapes = await self._lookup(("shapes", campaign_id), lambda c: find_code_shapes(c, campaign_id), conn)
        return shapes or ()
