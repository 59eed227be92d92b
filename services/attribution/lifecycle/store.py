"""SQL of the lifecycle jobs: bulk status changes, code holds, the alert cursor."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from services.attribution.common.database import Connection


async def set_status(conn: Connection, conversion_ids: Sequence[str], status: str) -> None:
    await conn.execute(
        "UPDATE conversions SET status = $2, updated_at = now() WHERE id = ANY($1::text[])",
        list(conversion_ids),
        status,
    )


async def hold_unique_code(conn: Connection, campaign_id: str, code: str, detail: str) -> bool:
    """ACTIVE UNIQUE code -> HOLD, with the change in the code's history."""
    row = await conn.fetchrow(
        """UPDATE coupons SET status = 'hold', updated_at = now()
            WHERE campaign_id = $1 AND code = $2 AND kind = 'unique' AND status = 'active'
        RETURNING code""",
        campaign_id,
        code,
    )
    if row is None:
        return False
    await conn.execute(
        """INSERT INTO coupon_events (campaign_id, code, actor, from_status, to_status, detail)
           VALUES ($1, $2, 'leak_response', 'active', 'hold', $3)""",
        campaign_id,
        code,
        detail,
    )
    return True


async def get_alert_cursor(conn: Connection | asyncpg.Pool, name: str) -> str | None:
    value = await conn.fetchval("SELECT after_id FROM alert_cursor WHERE name = $1", name)
    return str(value) if value is not None else None


async def set_alert_cursor(conn: Connection | asyncpg.Pool, name: str, after_id: str) -> None:
    await conn.execute(
        """INSERT INTO alert_cursor (name, after_id) VALUES ($1, $2)
           ON CONFLICT (name) DO UPDATE SET after_id = EXCLUDED.after_id""",
        name,
        after_id,
    )
