"""The SQL checkout validation needs beyond the catalog's: read-only, no use is taken."""

from __future__ import annotations

from services.attribution.common.database import Executor


async def customer_uses(db: Executor, campaign_id: str, code: str, customer_id: str) -> int:
    """The customer's live uses of a code (what the per-customer limit is checked against)."""
    used = await db.fetchval(
        "SELECT used FROM customer_usage WHERE campaign_id = $1 AND code = $2 AND customer_id = $3",
        campaign_id,
        code,
        customer_id,
    )
    return int(used or 0)
