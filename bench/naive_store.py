"""The reference redemption store: lock the row, check, update, one use per transaction.

This is what most code does first, and what the real store is measured
against: every use holds the hot row's lock for two round trips, so callers
on one code queue behind each other.
"""

from __future__ import annotations

import asyncpg


async def take_use(pool: asyncpg.Pool, campaign_id: str, code: str) -> bool:
    """Takes one use of the code; False when it is unknown or used up."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT usage_limit, used FROM coupons WHERE campaign_id = $1 AND code = $2 FOR UPDATE",
            campaign_id,
            code,
        )
        if row is None or (row["usage_limit"] and row["used"] >= row["usage_limit"]):
            return False
        await conn.execute(
            "UPDATE coupons SET used = used + 1 WHERE campaign_id = $1 AND code = $2", campaign_id, code
        )
        return True
