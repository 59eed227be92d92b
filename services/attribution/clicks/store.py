"""All SQL about clicks.

Every statement names a click by ``(click_id, created_at)``, the table's key:
``created_at`` is the time the id encodes (``ids.click_created_at``), so
PostgreSQL reads the one partition that holds the click instead of all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from services.attribution.common.database import Connection, Executor
from services.attribution.common.models import Click
from services.attribution.common.reasons import REASONS_SEPARATOR

_INSERT_COLUMNS = (
    "click_id",
    "created_at",
    "campaign_id",
    "affiliate_id",
    "coupon_code",
    "requested_coupon_code",
    "external_click_id",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "ip",
    "user_agent",
    "referer",
    "country",
    "occurred_at",
    "decision",
    "reasons",
    "fraud_score",
    "device_type",
    "is_unique",
)
_SELECT_COLUMNS = ", ".join((*_INSERT_COLUMNS, "conversions"))

# One parameter, an array of rows (migration 009's ascribe_click_row_v3, fields
# in _INSERT_COLUMNS order), so any number of rows is one statement that
# asyncpg prepares once.
_INSERT_CLICKS = f"""
INSERT INTO clicks ({", ".join(_INSERT_COLUMNS)}, channel, currency)
SELECT r.click_id, r.created_at, r.campaign_id, r.affiliate_id, r.coupon_code, r.requested_coupon_code,
       r.external_click_id, r.sub1, r.sub2, r.sub3, r.sub4, r.sub5, r.ip::inet, r.user_agent, r.referer, r.country,
       r.occurred_at, r.decision, string_to_array(r.reasons, '{REASONS_SEPARATOR}'), r.fraud_score, r.device_type,
       r.is_unique, a.channel, c.currency
FROM unnest($1::ascribe_click_row_v3[]) r
-- The keys reports count the click under as they are now (migration 014): a
-- later UpdateAffiliate does not move it; NULL when the affiliate is unknown.
LEFT JOIN affiliates a ON a.id = r.affiliate_id
LEFT JOIN campaigns c ON c.id = r.campaign_id
"""



def _record(click: Click) -> tuple[object, ...]:
    # Absent optional values are NULL, not '', so SQL audits can say IS NULL.
    sub1, sub2, sub3, sub4, sub5 = click.subs
    return (
        click.click_id,
        click.created_at,
        click.campaign_id,
        click.affiliate_id,
        click.coupon_code or None,
        click.requested_coupon_code or None,
        click.external_click_id or None,
        sub1 or None,
        sub2 or None,
        sub3 or None,
        sub4 or None,
        sub5 or None,
        click.ip or None,
        click.user_agent or None,
        click.referer or None,
        click.country or None,
        click.occurred_at,
        click.decision,
        REASONS_SEPARATOR.join(click.reasons),
        click.fraud_score,
        click.device_type,
        click.unique,
    )


async def insert_clicks(conn: Connection, clicks: Sequence[Click]) -> None:
    """Writes the clicks with one statement: all of them are committed, or none.

    Run outside a transaction, the statement is its own commit, so a group
    commit costs one round trip and one WAL flush whatever the number of rows.
    """
    await conn.execute(_INSERT_CLICKS, [_record(click) for click in clicks])


def click_from_row(row: asyncpg.Record) -> Click:
    ip = row["ip"]
    return Click(
        click_id=row["click_id"],
        created_at=row["created_at"],
        campaign_id=row["campaign_id"],
        affiliate_id=row["affiliate_id"],
        occurred_at=row["occurred_at"],
        decision=row["decision"],
        coupon_code=row["coupon_code"],
        requested_coupon_code=row["requested_coupon_code"],
        external_click_id=row["external_click_id"],
        subs=(row["sub1"] or "", row["sub2"] or "", row["sub3"] or "", row["sub4"] or "", row["sub5"] or ""),
        ip=str(ip) if ip is not None else None,
        user_agent=row["user_agent"],
        referer=row["referer"],
        country=row["country"],
        reasons=tuple(row["reasons"]),
        fraud_score=row["fraud_score"],
        conversions=row["conversions"],
        device_type=row["device_type"],
        unique=row["is_unique"],
    )


async def get_click(conn: Executor, click_id: str, created_at: datetime) -> Click | None:
    row = await conn.fetchrow(
        f"SELECT {_SELECT_COLUMNS} FROM clicks WHERE click_id = $1 AND created_at = $2",
        click_id,
        created_at,
    )
    return click_from_row(row) if row is not None else None


async def take_click_slot(
    conn: Connection, click_id: str, created_at: datetime, max_per_click: int
) -> bool:
    """Counts one more live conversion on the click, unless it is at its limit.

    ``max_per_click`` 0 means no limit. One conditional UPDATE, so the limit
    holds under any concurrency and on any number of replicas: concurrent
    callers queue on the row lock and each re-checks the condition. Call it
    inside the conversion's transaction so a rollback gives the slot back.
    False when the click is at its limit (or does not exist).
    """
    row = await conn.fetchval(
        """UPDATE clicks SET conversions = conversions + 1
           WHERE click_id = $1 AND created_at = $2 AND ($3::int = 0 OR conversions < $3::int)
           RETURNING 1""",
        click_id,
        created_at,
        max_per_click,
    )
    return row is not None


async def release_click_slot(conn: Connection, click_id: str, created_at: datetime) -> bool:
    """Gives back one live conversion of the click (a refund, a rejection on review).

    False when there was none to give back (the count never goes below zero).
    """
    row = await conn.fetchval(
        """UPDATE clicks SET conversions = conversions - 1
           WHERE click_id = $1 AND created_at = $2 AND conversions > 0
           RETURNING 1""",
        click_id,
        created_at,
    )
    return row is not None


async def ensure_click_partitions(conn: Executor, days_back: int, days_ahead: int) -> int:
    """Creates the missing daily partitions; returns how many were created."""
    created = await conn.fetchval("SELECT ascribe_ensure_click_partitions($1, $2)", days_back, days_ahead)
    return int(created or 0)


async def fetch_clicks(
    conn: Connection, clicks: Sequence[tuple[str, datetime]]
) -> dict[str, Click]:
    """The clicks named by postbacks; the time in each id selects one partition."""
    if not clicks:
        return {}
    rows = await conn.fetch(
        """SELECT c.click_id, c.created_at, c.campaign_id, c.affiliate_id, c.occurred_at,
                  c.decision, c.conversions, c.country, c.device_type, c.sub1
             FROM clicks c
             JOIN unnest($1::text[], $2::timestamptz[]) AS k(click_id, created_at)
               ON c.click_id = k.click_id AND c.created_at = k.created_at""",
        [c[0] for c in clicks],
        [c[1] for c in clicks],
    )
    found = {}
    for r in rows:
        values = dict(r)
        # sub1: what reports count the click's conversions under
        values["subs"] = (values.pop("sub1") or "", "", "", "", "")
        found[r["click_id"]] = Click(**values)
    return found
