"""SQL of conversions: order locks, reads, batched writes, history, queues."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.attribution.common.database import Connection
from services.attribution.common.models import Conversion, ConversionEvent
from services.attribution.common.reasons import REASONS_SEPARATOR
from services.attribution.conversions.redemptions import LedgerRow, ledger_record

OrderKey = tuple[str, str]  # (campaign_id, order_id)

CONVERSION_COLUMNS = """id, campaign_id, order_id, fingerprint, status, reasons, affiliate_id, source,
    click_id, click_created_at, coupon_code, customer_id, amount_micros, discount_micros,
    refunded_micros, currency, payout_micros, hold_until, coupon_remaining, fraud_score,
    needs_rescore, holds_coupon_use, holds_customer_use, holds_click_slot, received_at, occurred_at, request"""


def conversion_from_row(row: asyncpg.Record, history: Sequence[ConversionEvent] = ()) -> Conversion:
    values: dict[str, Any] = dict(row)
    values["reasons"] = tuple(values["reasons"] or ())
    values["fingerprint"] = bytes(values["fingerprint"])
    request = values["request"]
    values["request"] = json.loads(request) if isinstance(request, str) else dict(request or {})
    return Conversion(**values, history=tuple(history))


def _order_lock_keys(keys: Sequence[OrderKey]) -> list[str]:
    return sorted({f"{campaign_id}\x1f{order_id}" for campaign_id, order_id in keys})


async def lock_orders(conn: Connection, keys: Sequence[OrderKey]) -> None:
    """Serializes concurrent copies of the same orders, on every replica.

    Transaction-scoped advisory locks, taken in a fixed order so two batches
    that share orders cannot deadlock; they are released at commit.
    """
    await conn.execute(
        """SELECT pg_advisory_xact_lock(h)
             FROM (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h) s""",
        _order_lock_keys(keys),
    )


async def lock_and_fetch_orders(
    conn: Connection, keys: Sequence[OrderKey]
) -> dict[OrderKey, Conversion]:
    """``lock_orders``, then the stored conversions of those orders, in one round trip.

    Migration 004's function takes the locks and then reads with a snapshot
    taken after them (why two statements in one call are safe there).
    """
    if not keys:
        return {}
    rows = await conn.fetch(
        f"SELECT {CONVERSION_COLUMNS} FROM ascribe_locked_orders($1::text[], $2::text[], $3::text[])",
        _order_lock_keys(keys),
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["campaign_id"], r["order_id"]): conversion_from_row(r) for r in rows}


async def get_by_order(
    conn: Connection | asyncpg.Pool, campaign_id: str, order_id: str, *, for_update: bool = False
) -> Conversion | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {CONVERSION_COLUMNS} FROM conversions WHERE campaign_id = $1 AND order_id = $2{lock}",
        campaign_id,
        order_id,
    )
    return conversion_from_row(row) if row else None


_INSERT_COLUMNS = [
    "id", "campaign_id", "order_id", "fingerprint", "status", "reasons", "affiliate_id", "source",
    "click_id", "click_created_at", "coupon_code", "customer_id", "amount_micros", "discount_micros",
    "refunded_micros", "currency", "payout_micros", "hold_until", "coupon_remaining", "fraud_score",
    "needs_rescore", "holds_coupon_use", "holds_customer_use", "holds_click_slot", "received_at", "occurred_at", "request",
]


def _record(c: Conversion) -> tuple[Any, ...]:
    return (
        c.id, c.campaign_id, c.order_id, c.fingerprint, c.status, list(c.reasons), c.affiliate_id,
        c.source, c.click_id, c.click_created_at, c.coupon_code, c.customer_id, c.amount_micros,
        c.discount_micros, c.refunded_micros, c.currency, c.payout_micros, c.hold_until,
        c.coupon_remaining, c.fraud_score, c.needs_rescore, c.holds_coupon_use, c.holds_customer_use, c.holds_click_slot, c.received_at,
        c.occurred_at, json.dumps(c.request),
    )


_EVENT_COLUMNS = ["conversion_id", "at", "from_status", "to_status", "reason", "actor", "note", "amount_micros"]
_LEDGER_COLUMNS = ["campaign_id", "code", "conversion_id", "customer_id", "taken_at"]
_FROM_ROW = {"reasons": f"string_to_array(reasons, '{REASONS_SEPARATOR}')", "request": "request::jsonb"}

# Conversions, their first history events and their ledger rows in one
# statement: one round trip per batch. Each travels as one array of rows of
# migration 006's row types (the idiom of every multi-row write here; only
# bulk codes go in by COPY, catalog/store.py, where issue #15 measures them
# against a bare COPY), with the reason words comma-joined and the request as
# JSON text.
_INSERT_JUDGED = f"""
WITH new_conversions AS (
    INSERT INTO conversions ({", ".join(_INSERT_COLUMNS)})
    SELECT {", ".join(_FROM_ROW.get(c, c) for c in _INSERT_COLUMNS)}
      FROM unnest($1::ascribe_conversion_row[])
    RETURNING 1
), new_events AS (
    INSERT INTO conversion_events ({", ".join(_EVENT_COLUMNS)})
    SELECT * FROM unnest($2::ascribe_event_row[])
    RETURNING 1
), new_uses AS (
    INSERT INTO redemptions ({", ".join(_LEDGER_COLUMNS)})
    SELECT * FROM unnest($3::ascribe_ledger_row[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_conversions), (SELECT count(*) FROM new_events),
       (SELECT count(*) FROM new_uses)
"""


async def insert_judged(
    conn: Connection,
    conversions: Sequence[Conversion],
    events: Sequence[EventRow],
    ledger: Sequence[LedgerRow],
) -> None:
    """Writes a judged batch: new conversions (their orders are locked and known new), events, uses."""
    records = []
    for c in conversions:
        record = list(_record(c))
        record[5] = REASONS_SEPARATOR.join(c.reasons)
        records.append(tuple(record))
    await conn.execute(
        _INSERT_JUDGED,
        records,
        [_event_record(e) for e in events],
        [ledger_record(r) for r in ledger],
    )


async def replace_conversion(conn: Connection, c: Conversion) -> None:
    """A re-judged order: the row takes the new outcome; its history keeps the old one."""
    assignments = ", ".join(f"{col} = ${i + 2}" for i, col in enumerate(_INSERT_COLUMNS[3:]))
    await conn.execute(
        f"UPDATE conversions SET {assignments}, updated_at = now() WHERE id = $1",
        c.id,
        *_record(c)[3:],
    )


@dataclass(frozen=True)
class EventRow:
    conversion_id: str
    event: ConversionEvent


def _event_record(e: EventRow) -> tuple[Any, ...]:
    return (e.conversion_id, e.event.at, e.event.from_status, e.event.to_status, e.event.reason,
            e.event.actor, e.event.note, e.event.amount_micros)


async def insert_events(conn: Connection, events: Sequence[EventRow]) -> None:
    if events:
        await conn.execute(
            f"INSERT INTO conversion_events ({', '.join(_EVENT_COLUMNS)}) "
            "SELECT * FROM unnest($1::ascribe_event_row[])",
            [_event_record(e) for e in events],
        )


async def history(conn: Connection | asyncpg.Pool, conversion_id: str) -> list[ConversionEvent]:
    rows = await conn.fetch(
        """SELECT from_status, to_status, at, reason, actor, note, amount_micros
             FROM conversion_events WHERE conversion_id = $1 ORDER BY id""",
        conversion_id,
    )
    return [ConversionEvent(**dict(r)) for r in rows]


async def update_state(
    conn: Connection,
    conversion_id: str,
    *,
    status: str,
    reasons: Sequence[str],
    refunded_micros: int,
    payout_micros: int,
    released: bool,
    needs_rescore: bool,
    fraud_score: int,
    hold_until: datetime | None,
) -> None:
    await conn.execute(
        """UPDATE conversions
              SET status = $2, reasons = $3, refunded_micros = $4, payout_micros = $5,
                  holds_coupon_use = holds_coupon_use AND NOT $6,
                  holds_customer_use = holds_customer_use AND NOT $6,
                  holds_click_slot = holds_click_slot AND NOT $6,
                  needs_rescore = $7, fraud_score = $8, hold_until = $9,
                  updated_at = now()
            WHERE id = $1""",
        conversion_id, status, list(reasons), refunded_micros, payout_micros, released,
        needs_rescore, fraud_score, hold_until,
    )


async def list_conversions(
    conn: Connection | asyncpg.Pool,
    *,
    campaign_id: str,
    status: str | None,
    affiliate_id: str | None,
    received_from: datetime | None,
    received_to: datetime | None,
    after: tuple[datetime, str] | None,
    limit: int,
    coupon_code: str | None = None,
) -> list[Conversion]:
    """Newest first, keyset-paged on (received_at, id)."""
    rows = await conn.fetch(
        f"""SELECT {CONVERSION_COLUMNS} FROM conversions
             WHERE campaign_id = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR affiliate_id = $3)
               AND ($4::timestamptz IS NULL OR received_at >= $4)
               AND ($5::timestamptz IS NULL OR received_at < $5)
               AND ($6::timestamptz IS NULL OR (received_at, id) < ($6, $7))
               AND ($9::text IS NULL OR coupon_code = $9)
             ORDER BY received_at DESC, id DESC
             LIMIT $8""",
        campaign_id, status, affiliate_id, received_from, received_to,
        after[0] if after else None, after[1] if after else "", limit, coupon_code,
    )
    return [conversion_from_row(r) for r in rows]


async def refund_exists(
    conn: Connection, campaign_id: str, order_id: str, refund_id: str
) -> int | None:
    """The amount of an earlier refund with this id, or None."""
    value = await conn.fetchval(
        "SELECT amount_micros FROM refunds WHERE campaign_id = $1 AND order_id = $2 AND refund_id = $3",
        campaign_id, order_id, refund_id,
    )
    return int(value) if value is not None else None


async def insert_refund(
    conn: Connection, campaign_id: str, order_id: str, refund_id: str, amount_micros: int, reason: str
) -> None:
    await conn.execute(
        """INSERT INTO refunds (campaign_id, order_id, refund_id, amount_micros, reason)
           VALUES ($1, $2, $3, $4, $5)""",
        campaign_id, order_id, refund_id, amount_micros, reason,
    )


async def lock_due_pending(conn: Connection, now: datetime, limit: int) -> list[Conversion]:
    """PENDING conversions whose hold has passed, locked so each is approved once across replicas."""
    rows = await conn.fetch(
        f"""SELECT {CONVERSION_COLUMNS} FROM conversions
             WHERE status = 'pending' AND hold_until <= $1
             ORDER BY hold_until
             LIMIT $2
               FOR UPDATE SKIP LOCKED""",
        now, limit,
    )
    return [conversion_from_row(r) for r in rows]


async def oldest_due_pending(conn: Connection | asyncpg.Pool, now: datetime) -> datetime | None:
    value = await conn.fetchval(
        "SELECT min(hold_until) FROM conversions WHERE status = 'pending' AND hold_until <= $1", now
    )
    return value if isinstance(value, datetime) else None


@dataclass(frozen=True)
class Rescore:
    conversion_id: str
    status: str
    reasons: Sequence[str]
    fraud_score: int


async def set_rescored(conn: Connection, rows: Sequence[Rescore]) -> set[str]:
    """Applies a round of re-scores in one statement; answers the ids it changed.

    A conversion that is no longer FLAGGED and waiting for its re-score (a
    person or a refund got there first) is left alone.
    """
    if not rows:
        return set()
    changed = await conn.fetch(
        f"""UPDATE conversions c
               SET status = r.status, reasons = string_to_array(r.reasons, '{REASONS_SEPARATOR}'),
                   fraud_score = r.fraud_score, needs_rescore = false, updated_at = now()
              FROM unnest($1::ascribe_rescore_row[]) AS r
             WHERE c.id = r.id AND c.status = 'flagged' AND c.needs_rescore
         RETURNING c.id""",
        [(r.conversion_id, r.status, REASONS_SEPARATOR.join(r.reasons), r.fraud_score) for r in rows],
    )
    return {row["id"] for row in changed}


async def rescore_candidates(conn: Connection | asyncpg.Pool, limit: int) -> list[Conversion]:
    """FLAGGED conversions waiting for the fraud service, oldest first (read only)."""
    rows = await conn.fetch(
        f"""SELECT {CONVERSION_COLUMNS} FROM conversions
             WHERE needs_rescore AND status = 'flagged'
             ORDER BY received_at
             LIMIT $1""",
        limit,
    )
    return [conversion_from_row(r) for r in rows]
