"""SQL of webhooks: the webhooks, the outbox's fan-out, the deliveries' claims and results."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.attribution.common.database import Connection, Executor
from services.attribution.webhooks import rules
from services.common.errors import AlreadyExists, InvalidArgument, NotFound

WEBHOOK_ID_PREFIX = "whk_"
DELIVERY_ID_PREFIX = "dlv_"
EVENT_ID_PREFIX = "evt_"


def new_secret() -> str:
    """256 random bits, 43 URL-safe characters (above the 32 the contract asks)."""
    return "whsec_" + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(12)


@dataclass(frozen=True)
class WebhookRow:
    id: str
    kind: str
    campaign_id: str | None
    affiliate_id: str | None
    url: str
    http_method: str
    events: list[str]
    secret: str
    previous_secret: str | None = None
    previous_secret_until: datetime | None = None
    description: str = ""
    enabled: bool = True
    disabled_reason: str = ""
    created_at: datetime | None = None

    def live_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign now: the current one, and a rotated one inside its overlap."""
        found = [self.secret]
        if self.previous_secret and self.previous_secret_until and now < self.previous_secret_until:
            found.append(self.previous_secret)
        return found


_WEBHOOK_COLUMNS = (
    "id, kind, campaign_id, affiliate_id, url, http_method, events, secret, previous_secret, "
    "previous_secret_until, description, enabled, disabled_reason, created_at"
)


def _webhook(row: asyncpg.Record) -> WebhookRow:
    return WebhookRow(**{**dict(row), "events": list(row["events"])})


def _reference_error(error: asyncpg.ForeignKeyViolationError) -> InvalidArgument:
    field = "webhook.affiliate_id" if "affiliate" in (error.constraint_name or "") else "webhook.campaign_id"
    return InvalidArgument.one(field, "no such " + field.split(".")[1].removesuffix("_id"))


async def insert_webhook(conn: Executor, w: WebhookRow) -> WebhookRow:
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO webhooks (id, kind, campaign_id, affiliate_id, url, http_method, events, secret,
                                     description)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                RETURNING {_WEBHOOK_COLUMNS}""",
            w.id, w.kind, w.campaign_id, w.affiliate_id, w.url, w.http_method, w.events, w.secret, w.description,
        )
    except asyncpg.ForeignKeyViolationError as error:
        raise _reference_error(error) from None
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"webhook {w.id} already exists") from None
    assert row is not None
    return _webhook(row)


async def get_webhook(conn: Executor, webhook_id: str) -> WebhookRow:
    row = await conn.fetchrow(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1", webhook_id)
    if row is None:
        raise NotFound(f"no webhook {webhook_id}")
    return _webhook(row)


async def list_webhooks(conn: Executor, *, campaign_id: str, after: str, limit: int) -> list[WebhookRow]:
    rows = await conn.fetch(
        f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks
             WHERE ($1 = '' OR campaign_id = $1) AND id > $2 ORDER BY id LIMIT $3""",
        campaign_id, after, limit,
    )
    return [_webhook(r) for r in rows]


async def enabled_webhooks(conn: Executor) -> list[WebhookRow]:
    rows = await conn.fetch(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE enabled")
    return [_webhook(r) for r in rows]


async def update_webhook(
    pool: asyncpg.Pool, webhook_id: str, change: Callable[[WebhookRow], WebhookRow]
) -> WebhookRow:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1 FOR UPDATE", webhook_id)
        if row is None:
            raise NotFound(f"no webhook {webhook_id}")
        current = _webhook(row)
        new = change(current)
        # Enabling again starts the 3 days of failures afresh.
        try:
            updated = await conn.fetchrow(
                f"""UPDATE webhooks SET affiliate_id = $2, url = $3, http_method = $4, events = $5,
                           description = $6, enabled = $7,
                           disabled_reason = CASE WHEN $7 THEN '' ELSE disabled_reason END,
                           failing_since = CASE WHEN $7 AND NOT enabled THEN NULL ELSE failing_since END,
                           updated_at = now()
                     WHERE id = $1 RETURNING {_WEBHOOK_COLUMNS}""",
                webhook_id, new.affiliate_id, new.url, new.http_method, new.events, new.description, new.enabled,
            )
        except asyncpg.ForeignKeyViolationError as error:
            raise _reference_error(error) from None
        assert updated is not None
        return _webhook(updated)


async def delete_webhook(pool: asyncpg.Pool, webhook_id: str, now: datetime) -> int:
    """Deletes the webhook and cancels its pending deliveries (answers how many)."""
    async with pool.acquire() as conn, conn.transaction():
        deleted = await conn.fetchval("DELETE FROM webhooks WHERE id = $1 RETURNING id", webhook_id)
        if deleted is None:
            raise NotFound(f"no webhook {webhook_id}")
        result = await conn.execute(
            """UPDATE webhook_deliveries SET state = 'cancelled', next_attempt_at = NULL, finished_at = $2,
                      last_error = 'webhook deleted'
                WHERE webhook_id = $1 AND state = 'pending'""",
            webhook_id, now,
        )
        return int(result.split()[-1])


async def rotate_secret(pool: asyncpg.Pool, webhook_id: str, secret: str, now: datetime) -> WebhookRow:
    row = await pool.fetchrow(
        f"""UPDATE webhooks SET previous_secret = secret, previous_secret_until = $3, secret = $2,
                   updated_at = now()
             WHERE id = $1 RETURNING {_WEBHOOK_COLUMNS}""",
        webhook_id, secret, now + rules.SECRET_OVERLAP,
    )
    if row is None:
        raise NotFound(f"no webhook {webhook_id}")
    return _webhook(row)


# ------------------------------------------------------------ deliveries


@dataclass(frozen=True)
class DeliveryRow:
    id: str
    webhook_id: str
    event_id: str
    event: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    payload: dict[str, Any]
    last_status_code: int
    last_error: str
    created_at: datetime
    delivered_at: datetime | None
    seq: int


_DELIVERY_COLUMNS = (
    "id, webhook_id, event_id, event, state, attempts, next_attempt_at, payload, last_status_code, last_error, "
    "created_at, delivered_at, seq"
)


def _delivery(row: asyncpg.Record) -> DeliveryRow:
    values = dict(row)
    values["payload"] = json.loads(values["payload"])
    return DeliveryRow(**{k: values[k] for k in DeliveryRow.__dataclass_fields__})


async def list_deliveries(
    conn: Executor, *, webhook_id: str, state: str | None, before_seq: int | None, limit: int
) -> list[DeliveryRow]:
    rows = await conn.fetch(
        f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries
             WHERE webhook_id = $1 AND ($2::text IS NULL OR state = $2) AND ($3::bigint IS NULL OR seq < $3)
             ORDER BY seq DESC LIMIT $4""",
        webhook_id, state, before_seq, limit,
    )
    return [_delivery(r) for r in rows]


async def get_delivery(conn: Executor, delivery_id: str) -> DeliveryRow:
    row = await conn.fetchrow(f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1", delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    return _delivery(row)


async def redeliver(conn: Executor, delivery_id: str, now: datetime) -> DeliveryRow:
    """Back to pending on a fresh schedule, same id; its webhook must still exist."""
    row = await conn.fetchrow(
        f"""UPDATE webhook_deliveries d SET state = 'pending', attempts = 0, next_attempt_at = $2,
                   finished_at = NULL, last_error = ''
              FROM webhooks w
             WHERE d.id = $1 AND w.id = d.webhook_id
         RETURNING {", ".join("d." + c.strip() for c in _DELIVERY_COLUMNS.split(","))}""",
        delivery_id, now,
    )
    if row is None:
        await get_delivery(conn, delivery_id)  # NotFound when it does not exist at all
        raise NotFound(f"the webhook of delivery {delivery_id} was deleted")
    return _delivery(row)


async def insert_deliveries(conn: Executor, deliveries: Sequence[tuple[str, str, str, str, str, datetime]]) -> None:
    """(id, webhook_id, event_id, event, payload JSON, first attempt at); a repeated event is skipped."""
    if not deliveries:
        return
    # KEY SHARE on each webhook (what a foreign key would take): a concurrent
    # DeleteWebhook waits for this transaction and then cancels these rows
    # too, or has committed and the join drops them. Without it a fan-out
    # that read the webhook before the delete left deliveries pending for ever.
    await conn.execute(
        """INSERT INTO webhook_deliveries (id, webhook_id, event_id, event, state, payload, next_attempt_at)
           SELECT t.id, t.webhook_id, t.event_id, t.event, 'pending', t.payload::jsonb, t.at
             FROM unnest($1::ascribe_delivery_row[]) WITH ORDINALITY AS t (id, webhook_id, event_id, event, payload, at, n)
             JOIN webhooks w ON w.id = t.webhook_id
            ORDER BY t.n  -- the events' order, so equal first-attempt times are claimed in it
              FOR KEY SHARE OF w
           ON CONFLICT (webhook_id, event_id) DO NOTHING""",
        list(deliveries),
    )


# The outbox rows of one fan-out, with what a postback needs from the
# conversion and its click (which never change after the event).
_TAKE_OUTBOX = """
WITH taken AS (
    DELETE FROM webhook_outbox
     WHERE id IN (SELECT id FROM webhook_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
 RETURNING *
)
SELECT t.id, t.event, t.at, t.campaign_id, t.affiliate_id, t.conversion_id, t.coupon_code, t.status,
       t.amount_micros, t.refunded_micros, t.payout_micros, t.currency, t.alert_id, t.data,
       c.order_id, c.click_id, c.source, k.external_click_id,
       k.sub1, k.sub2, k.sub3, k.sub4, k.sub5
  FROM taken t
  LEFT JOIN conversions c ON c.id = t.conversion_id
  LEFT JOIN clicks k ON k.click_id = c.click_id AND k.created_at = c.click_created_at
 ORDER BY t.id
"""


async def take_outbox(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """Removes up to ``limit`` events from the outbox (call inside the fan-out's transaction)."""
    return [dict(r) for r in await conn.fetch(_TAKE_OUTBOX, limit)]


async def insert_alert_event(conn: Executor, alert_id: str, event: str, campaign_id: str, data: dict[str, Any]) -> None:
    """One event per alert id, whichever replica writes it first."""
    await conn.execute(
        """INSERT INTO webhook_outbox (event, campaign_id, affiliate_id, coupon_code, alert_id, data)
           VALUES ($1, NULLIF($2, ''), NULLIF($3, ''), NULLIF($4, ''), $5, $6::jsonb)
           ON CONFLICT (alert_id) DO NOTHING""",
        event, campaign_id, str(data.get("affiliate_id") or ""), str(data.get("coupon_code") or ""), alert_id,
        json.dumps(data),
    )


@dataclass(frozen=True)
class Claimed:
    delivery: DeliveryRow
    webhook: WebhookRow


async def claim_due(
    conn: Executor, now: datetime, limit: int, lease: timedelta, *, per_webhook: int, skip_webhooks: Sequence[str] = ()
) -> list[Claimed]:
    """Leases due deliveries: each is sent by one replica; a crash lets another retry after the lease.

    At most ``per_webhook`` of one webhook, none of ``skip_webhooks`` (whose
    receivers are at their concurrency limit here), so a slow receiver's
    backlog neither fills the claim nor bounces in and out of it. The window
    runs over the most overdue few thousand only; the rows are then locked
    by id (a window function and FOR UPDATE do not mix).
    """
    rows = await conn.fetch(
        f"""UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = $1::timestamptz + $3
              FROM (SELECT dd.id FROM webhook_deliveries dd
                     WHERE dd.id IN (
                           SELECT c.id FROM (
                                  SELECT o.id, row_number() OVER (PARTITION BY o.webhook_id ORDER BY o.next_attempt_at) AS rn
                                    FROM (SELECT id, webhook_id, next_attempt_at FROM webhook_deliveries
                                           WHERE state = 'pending' AND next_attempt_at <= $1
                                             AND NOT (webhook_id = ANY($5::text[]))
                                           ORDER BY next_attempt_at LIMIT 5000) o) c
                            WHERE c.rn <= $4)
                       AND dd.state = 'pending' AND dd.next_attempt_at <= $1
                     ORDER BY dd.next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) due,
                   webhooks w
             WHERE d.id = due.id AND w.id = d.webhook_id
         RETURNING {", ".join("d." + c.strip() for c in _DELIVERY_COLUMNS.split(","))},
                   {", ".join("w." + c.strip() + " AS w_" + c.strip() for c in _WEBHOOK_COLUMNS.split(","))}""",
        now, limit, lease, per_webhook, list(skip_webhooks),
    )
    claimed = []
    for row in rows:
        values = dict(row)
        webhook = WebhookRow(**{
            c.strip(): values["w_" + c.strip()] for c in _WEBHOOK_COLUMNS.split(",")
        })
        claimed.append(Claimed(_delivery(row), replace(webhook, events=list(webhook.events))))
    return claimed


async def record_delivered(conn: Executor, delivery_id: str, attempts: int, status: int, now: datetime) -> None:
    await conn.execute(
        """WITH d AS (
               UPDATE webhook_deliveries SET state = 'delivered', next_attempt_at = NULL, last_status_code = $3,
                      last_error = '', delivered_at = $4, finished_at = $4
                WHERE id = $1 AND state = 'pending' AND attempts = $2
            RETURNING webhook_id)
           UPDATE webhooks SET failing_since = NULL WHERE id IN (SELECT webhook_id FROM d)
                                                      AND failing_since IS NOT NULL""",
        delivery_id, attempts, status, now,
    )


async def release_claim(conn: Executor, delivery_id: str, attempts: int, at: datetime) -> None:
    """Gives a claimed delivery back unattempted (its receiver is at its concurrency limit)."""
    await conn.execute(
        """UPDATE webhook_deliveries SET attempts = attempts - 1, next_attempt_at = $3
            WHERE id = $1 AND state = 'pending' AND attempts = $2""",
        delivery_id, attempts, at,
    )


async def record_retry(
    conn: Executor, delivery_id: str, attempts: int, status: int, error: str, at: datetime
) -> None:
    await conn.execute(
        """UPDATE webhook_deliveries SET next_attempt_at = $5, last_status_code = $3, last_error = $4
            WHERE id = $1 AND state = 'pending' AND attempts = $2""",
        delivery_id, attempts, status, error[:500], at,
    )


async def record_dead(
    pool: asyncpg.Pool, delivery_id: str, attempts: int, status: int, error: str, now: datetime
) -> bool:
    """Marks the delivery dead; disables its webhook after 3 days of nothing but deaths (answers whether it died)."""
    async with pool.acquire() as conn, conn.transaction():
        webhook_id = await conn.fetchval(
            """UPDATE webhook_deliveries SET state = 'dead', next_attempt_at = NULL, last_status_code = $3,
                      last_error = $4, finished_at = $5
                WHERE id = $1 AND state = 'pending' AND attempts = $2
            RETURNING webhook_id""",
            delivery_id, attempts, status, error[:500], now,
        )
        if webhook_id is None:
            return False
        failing_since = await conn.fetchval(
            """UPDATE webhooks SET failing_since = coalesce(failing_since, $2) WHERE id = $1
            RETURNING failing_since""",
            webhook_id, now,
        )
        if rules.should_disable(failing_since, now):
            await conn.execute(
                """UPDATE webhooks SET enabled = false, updated_at = now(),
                          disabled_reason = 'every delivery failed for 3 days (since ' || $2 || ')'
                    WHERE id = $1 AND enabled""",
                webhook_id, rules.rfc3339(failing_since),
            )
        return True


CLEANUP_CHUNK = 5000


async def delete_old_deliveries(conn: Executor, now: datetime, limit: int = CLEANUP_CHUNK) -> int:
    """Finished deliveries past the 30 days they are kept (a bounded chunk per call)."""
    result = await conn.execute(
        """DELETE FROM webhook_deliveries WHERE id IN (
               SELECT id FROM webhook_deliveries WHERE state <> 'pending' AND finished_at < $1 LIMIT $2)""",
        now - rules.RETENTION, limit,
    )
    return int(result.split()[-1])


async def delivery_lag_seconds(conn: Executor, now: datetime) -> float:
    """How late the most overdue pending delivery is (the due index answers it)."""
    value = await conn.fetchval(
        """SELECT extract(epoch FROM $1::timestamptz - min(next_attempt_at))
             FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= $1""",
        now,
    )
    return max(0.0, float(value or 0))
