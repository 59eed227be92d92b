"""Read-side lookups of the catalog for the hot paths (clicks, conversions).

Row -> model mapping lives here too, so the catalog CRUD and the hot paths
build the same records from the same columns.
"""

from __future__ import annotations

import time
from typing import Any, cast

import asyncpg

from services.attribution.models import Affiliate, Campaign, Coupon

CAMPAIGN_COLUMNS = """id, name, landing_url, currency, hold_days, click_lookback_days,
    max_conversions_per_click, attribution_policy, payout_micros, payout_percent_bp,
    reuse_unique_after_refund, status, created_at, postback_token_sha256"""
AFFILIATE_COLUMNS = "id, name, channel, status, created_at"
COUPON_COLUMNS = """campaign_id, code, kind, status, valid_from, valid_until, usage_limit, used,
    allow_all_affiliates, affiliate_ids, per_customer_limit, discount_percent_bp, discount_micros,
    countries, device_types, channels, skus, min_order_micros, assigned_customer_id, batch_id,
    created_at"""

_ARRAY_FIELDS = ("affiliate_ids", "countries", "device_types", "channels", "skus")


def campaign_from_row(row: asyncpg.Record) -> Campaign:
    return Campaign(**dict(row))


def affiliate_from_row(row: asyncpg.Record) -> Affiliate:
    return Affiliate(**dict(row))


def coupon_from_row(row: asyncpg.Record) -> Coupon:
    values: dict[str, Any] = dict(row)
    for name in _ARRAY_FIELDS:
        values[name] = tuple(values[name] or ())
    return Coupon(**values)


async def get_campaign(conn: asyncpg.Connection | asyncpg.Pool, campaign_id: str) -> Campaign | None:
    row = await conn.fetchrow(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1", campaign_id)
    return campaign_from_row(row) if row else None


async def get_affiliate(conn: asyncpg.Connection | asyncpg.Pool, affiliate_id: str) -> Affiliate | None:
    row = await conn.fetchrow(f"SELECT {AFFILIATE_COLUMNS} FROM affiliates WHERE id = $1", affiliate_id)
    return affiliate_from_row(row) if row else None


async def get_coupon(
    conn: asyncpg.Connection | asyncpg.Pool, campaign_id: str, code: str
) -> Coupon | None:
    """``code`` must already be normalized (upper-case)."""
    row = await conn.fetchrow(
        f"SELECT {COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND code = $2", campaign_id, code
    )
    return coupon_from_row(row) if row else None


class CatalogCache:
    """A short-lived cache of campaigns, affiliates and coupons for hot paths.

    Several replicas cannot invalidate each other's caches, so entries simply
    expire after ``ttl_seconds`` (0 disables caching): a status change made by
    a person takes effect everywhere within that time. Usage counters are
    never taken from here; the conditional UPDATE reads them.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = 1.0, max_entries: int = 100_000) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._max = max_entries
        self._entries: dict[tuple[str, ...], tuple[float, object]] = {}

    def _get(self, key: tuple[str, ...]) -> tuple[bool, object]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return True, entry[1]
        return False, None

    def _put(self, key: tuple[str, ...], value: object) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self._ttl, value)

    async def campaign(self, campaign_id: str) -> Campaign | None:
        hit, value = self._get(("campaign", campaign_id))
        if hit:
            return cast(Campaign | None, value)
        campaign = await get_campaign(self._pool, campaign_id)
        self._put(("campaign", campaign_id), campaign)
        return campaign

    async def affiliate(self, affiliate_id: str) -> Affiliate | None:
        hit, value = self._get(("affiliate", affiliate_id))
        if hit:
            return cast(Affiliate | None, value)
        affiliate = await get_affiliate(self._pool, affiliate_id)
        self._put(("affiliate", affiliate_id), affiliate)
        return affiliate

    async def coupon(self, campaign_id: str, code: str) -> Coupon | None:
        hit, value = self._get(("coupon", campaign_id, code))
        if hit:
            return cast(Coupon | None, value)
        coupon = await get_coupon(self._pool, campaign_id, code)
        self._put(("coupon", campaign_id, code), coupon)
        return coupon
