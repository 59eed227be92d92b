"""Coupon uses: the conditional counter and the redemption ledger.

Exactness comes from row locks taken in one short transaction, in a fixed
order (campaign, code) so concurrent batches never deadlock, plus the CHECK
(used <= usage_limit) on the table as a last line of defence. Throughput on a
hot code comes from coalescing: one locked read and one UPDATE per code per
batch, however many uses the batch asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.attribution.common.database import Connection

CouponKey = tuple[str, str]  # (campaign_id, code)


@dataclass(frozen=True)
class CouponCounter:
    used: int
    usage_limit: int  # 0: unlimited


@dataclass(frozen=True)
class LedgerRow:
    campaign_id: str
    code: str
    conversion_id: str
    customer_id: str | None
    taken_at: datetime


async def lock_counters(conn: Connection, keys: Sequence[CouponKey]) -> dict[CouponKey, CouponCounter]:
    """Locks the coupons' rows (sorted, so batches never deadlock) and reads their counters."""
    ordered = sorted(set(keys))
    if not ordered:
        return {}
    rows = await conn.fetch(
        """SELECT c.campaign_id, c.code, c.used, c.usage_limit
             FROM coupons c
             JOIN unnest($1::text[], $2::text[]) AS k(campaign_id, code)
               ON c.campaign_id = k.campaign_id AND c.code = k.code
            ORDER BY c.campaign_id, c.code
              FOR UPDATE OF c""",
        [k[0] for k in ordered],
        [k[1] for k in ordered],
    )
    return {(r["campaign_id"], r["code"]): CouponCounter(r["used"], r["usage_limit"]) for r in rows}


async def add_uses(conn: Connection, deltas: dict[CouponKey, int]) -> None:
    """Applies signed use deltas (the UPDATE locks any row not locked yet, in key order)."""
    items = sorted((key, delta) for key, delta in deltas.items() if delta)
    if not items:
        return
    await conn.execute(
        """UPDATE coupons c SET used = c.used + d.delta, updated_at = now()
             FROM unnest($1::ascribe_use_delta_row[]) AS d
            WHERE c.campaign_id = d.campaign_id AND c.code = d.code""",
        [(key[0], key[1], delta) for key, delta in items],
    )


async def remaining_uses(conn: Connection, key: CouponKey) -> int | None:
    """A code's uses left now (None: unlimited, or no such code)."""
    value: int | None = await conn.fetchval(
        "SELECT usage_limit - used FROM coupons WHERE campaign_id = $1 AND code = $2 AND usage_limit > 0",
        key[0],
        key[1],
    )
    return value


UNKNOWN_CODE = "unknown"  # a grant for a code that no longer exists


async def grant_uses(conn: Connection, keys: Sequence[CouponKey]) -> list[int | str | None]:
    """One use for each entry of ``keys``, granted in order up to each code's limit.

    The codes' rows are locked once (sorted), and each counter moves by what
    was granted in one UPDATE. Per entry: the uses left after it (-1 when
    unlimited), None when its limit was reached, or ``UNKNOWN_CODE``.
    """
    counters = await lock_counters(conn, keys)
    used = {key: counter.used for key, counter in counters.items()}
    grants: list[int | str | None] = []
    for key in keys:
        counter = counters.get(key)
        if counter is None:
            grants.append(UNKNOWN_CODE)
        elif counter.usage_limit == 0:
            used[key] += 1
            grants.append(-1)
        elif used[key] < counter.usage_limit:
            used[key] += 1
            grants.append(counter.usage_limit - used[key])
        else:
            grants.append(None)
    await add_uses(conn, {key: used[key] - counters[key].used for key in counters})
    return grants


def ledger_record(row: LedgerRow) -> tuple[object, ...]:
    """A ledger row as migration 006's ascribe_ledger_row."""
    return (row.campaign_id, row.code, row.conversion_id, row.customer_id, row.taken_at)


async def insert_ledger(conn: Connection, rows: Sequence[LedgerRow]) -> None:
    if not rows:
        return
    await conn.execute(
        """INSERT INTO redemptions (campaign_id, code, conversion_id, customer_id, taken_at)
           SELECT * FROM unnest($1::ascribe_ledger_row[])""",
        [ledger_record(r) for r in rows],
    )


async def release_ledger(conn: Connection, conversion_id: str, reason: str) -> bool:
    """Marks the conversion's live ledger row released; False when it held none."""
    status = await conn.execute(
        """UPDATE redemptions SET released_at = now(), release_reason = $2
            WHERE conversion_id = $1 AND released_at IS NULL""",
        conversion_id,
        reason,
    )
    return bool(status != "UPDATE 0")


async def take_customer_use(
    conn: Connection, key: CouponKey, customer_id: str, limit: int
) -> bool:
    """One use of a code by one customer, if under the per-customer limit."""
    row = await conn.fetchrow(
        """INSERT INTO customer_usage AS u (campaign_id, code, customer_id, used)
           VALUES ($1, $2, $3, 1)
           ON CONFLICT (campaign_id, code, customer_id)
           DO UPDATE SET used = u.used + 1 WHERE u.used < $4
           RETURNING used""",
        key[0],
        key[1],
        customer_id,
        limit,
    )
    return row is not None


async def release_customer_use(conn: Connection, key: CouponKey, customer_id: str) -> None:
    await conn.execute(
        """UPDATE customer_usage SET used = used - 1
            WHERE campaign_id = $1 AND code = $2 AND customer_id = $3 AND used > 0""",
        key[0],
        key[1],
        customer_id,
    )
