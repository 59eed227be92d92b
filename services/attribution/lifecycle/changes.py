"""What happens to a conversion after it is recorded.

Refunds and chargebacks, a person's review, automatic approval when the hold
passes, re-scoring of conversions the fraud service could not check, and the
automatic HOLD of a UNIQUE code that leaks. Each change is one short
transaction that takes its locks in the recording path's order (order lock,
conversion row, customer use, click, code counter), and each is written to
the conversion's (or the code's) append-only history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

from services.attribution.catalog.cache import CatalogCache
from services.attribution.clicks import store as click_store
from services.attribution.common import coupon_rules
from services.attribution.common.database import Connection, retry_aborted
from services.attribution.common.models import Campaign, Conversion, ConversionEvent, ConversionStatus
from services.attribution.conversions import redemptions, store
from services.attribution.fraud_client import FraudClient, conversion_check, fraud_reasons
from services.attribution.lifecycle import store as lifecycle_store
from services.attribution.lifecycle.rules import rescore_outcome
from services.attribution.metrics import (
    APPROVAL_LAG_SECONDS,
    APPROVED_TOTAL,
    LEAK_HOLDS_TOTAL,
    RESCORED_TOTAL,
    REVERSED_TOTAL,
)
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.grpc_server import bearer_metadata
from services.common.tasks import raise_if_cancelling
from services.common.timestamps import utcnow

logger = logging.getLogger(__name__)

# Conversions re-scored per round: one candidates read, one fraud call (the
# client splits it into calls of its own size), one transaction. Large enough
# that an outage's backlog clears at thousands a second, small enough that a
# round's transaction stays short beside live traffic.
RESCORE_ROUND = 250

ALERT_CURSOR = "leak_response"


class Lifecycle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CatalogCache,
        fraud: FraudClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        rescore_per_second: float = 2500.0,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._fraud = fraud
        self.clock = clock
        self._rescore_per_second = rescore_per_second

    async def _campaign(self, campaign_id: str, conn: Connection | None = None) -> Campaign:
        campaign = await self._cache.campaign(campaign_id, conn)
        if campaign is None:
            raise NotFound(f"campaign {campaign_id!r} not found")
        return campaign

    # ------------------------------------------------------------ refunds

    async def reverse(
        self,
        campaign_id: str,
        order_id: str,
        *,
        refund_id: str,
        amount_micros: int | None,
        reason: str,
    ) -> Conversion:
        """A refund or chargeback: full (no amount, or all that remains) or partial."""
        return await retry_aborted(
            lambda: self._reverse(campaign_id, order_id, refund_id, amount_micros, reason), "refund"
        )

    async def _reverse(
        self, campaign_id: str, order_id: str, refund_id: str, amount_micros: int | None, reason: str
    ) -> Conversion:
        campaign = await self._campaign(campaign_id)
        async with self._pool.acquire() as conn, conn.transaction():
            await store.lock_orders(conn, [(campaign_id, order_id)])
            conversion = await store.get_by_order(conn, campaign_id, order_id, for_update=True)
            if conversion is None:
                raise NotFound(f"order {order_id!r} of campaign {campaign_id!r} not found")
            if refund_id:
                earlier = await store.refund_exists(conn, campaign_id, order_id, refund_id)
                if earlier is not None:
                    if amount_micros is not None and amount_micros != earlier:
                        raise AlreadyExists(f"refund {refund_id!r} was already applied with another amount")
                    return await self._refund_answer(conn, conversion)
            elif conversion.status == "reversed":
                # A refund without an id is a full one: idempotent by the state it leaves.
                return await self._refund_answer(conn, conversion)
            if conversion.status in ("rejected", "reversed"):
                raise FailedPrecondition(f"a {conversion.status} conversion cannot be refunded")
            remaining = conversion.amount_micros - conversion.refunded_micros
            amount = remaining if amount_micros is None else amount_micros
            if amount > remaining:
                raise InvalidArgument.one(
                    "amount_micros", f"{amount} is more than the {remaining} that remains to refund"
                )
            refunded = conversion.refunded_micros + amount
            full = amount == remaining
            if not full and not refund_id:
                # Without an id a retry could not be told from a second refund.
                raise InvalidArgument.one("refund_id", "a partial refund needs a refund_id")
            if refund_id:
                await store.insert_refund(conn, campaign_id, order_id, refund_id, amount, reason)
            if full:
                await self._give_back(conn, conversion, campaign, reason=reason, consume_unique=True)
                status: ConversionStatus = "reversed"
                payout = 0
            else:
                status = conversion.status
                payout = conversion.payout_micros
                if campaign.payout_percent_bp and conversion.affiliate_id and payout:
                    payout = coupon_rules.payout_micros(
                        conversion.amount_micros - refunded, 0, campaign.payout_percent_bp
                    )
            await store.update_state(
                conn, conversion.id, status=status, reasons=conversion.reasons, refunded_micros=refunded,
                payout_micros=payout, released=full, needs_rescore=conversion.needs_rescore and not full,
                fraud_score=conversion.fraud_score, hold_until=conversion.hold_until,
            )
            clawback = f"; payout {conversion.payout_micros} clawed back" if full and conversion.status == "approved" else ""
            await store.insert_events(conn, [store.EventRow(conversion.id, ConversionEvent(
                from_status=conversion.status, to_status=status, at=self.clock(), reason=reason,
                actor="shop", note=f"refund {refund_id or '(full)'}{clawback}", amount_micros=amount,
            ))])
            REVERSED_TOTAL.labels("full" if full else "partial").inc()
            reloaded = await store.get_by_order(conn, campaign_id, order_id)
            assert reloaded is not None
            return await self._refund_answer(conn, reloaded)

    async def _refund_answer(self, conn: Connection, conversion: Conversion) -> Conversion:
        """A refund answers with the code's uses left now, after the use it may have given back.

        (The stored ``coupon_remaining`` is what was left when the order took
        its use; a shop reading a refund's answer wants today's figure.)
        """
        if conversion.coupon_code and conversion.coupon_remaining is not None:
            now = await redemptions.remaining_uses(conn, (conversion.campaign_id, conversion.coupon_code))
            conversion = replace(conversion, coupon_remaining=now)
        return await self._with_history(conn, conversion)

    async def _give_back(
        self, conn: Connection, conversion: Conversion, campaign: Campaign, *, reason: str,
        consume_unique: bool,
    ) -> None:
        """Returns what the conversion holds, in lock order: customer use, click slot, code use.

        A refunded UNIQUE code stays used unless the campaign reuses them
        (``consume_unique``); a rejected sale always gives its use back.
        """
        key = (conversion.campaign_id, conversion.coupon_code or "")
        if conversion.holds_customer_use and conversion.customer_id:
            await redemptions.release_customer_use(conn, key, conversion.customer_id)
        if conversion.holds_click_slot and conversion.click_id and conversion.click_created_at:
            await click_store.release_click_slot(conn, conversion.click_id, conversion.click_created_at)
        if conversion.holds_coupon_use:
            keep = False
            if consume_unique and conversion.coupon_code and not campaign.reuse_unique_after_refund:
                coupon = await self._cache.coupon(conversion.campaign_id, conversion.coupon_code, conn)
                keep = coupon is not None and coupon.kind == "unique"
            if not keep:
                await redemptions.add_uses(conn, {key: -1})  # its UPDATE locks the row
                await redemptions.release_ledger(conn, conversion.id, reason)

    async def _reload(self, conn: Connection, conversion_id: str, campaign_id: str, order_id: str) -> Conversion:
        conversion = await store.get_by_order(conn, campaign_id, order_id)
        assert conversion is not None
        return await self._with_history(conn, conversion)

    @staticmethod
    async def _with_history(conn: Connection, conversion: Conversion) -> Conversion:
        """What every answer of the lifecycle carries: the row and its history, a retry's included."""
        return replace(conversion, history=tuple(await store.history(conn, conversion.id)))

    # ------------------------------------------------------------ review

    async def review(self, campaign_id: str, order_id: str, *, approve: bool, note: str) -> Conversion:
        """A person's decision on a FLAGGED conversion."""
        return await retry_aborted(lambda: self._review(campaign_id, order_id, approve, note), "review")

    async def _review(self, campaign_id: str, order_id: str, approve: bool, note: str) -> Conversion:
        campaign = await self._campaign(campaign_id)
        now = self.clock()
        async with self._pool.acquire() as conn, conn.transaction():
            await store.lock_orders(conn, [(campaign_id, order_id)])
            conversion = await store.get_by_order(conn, campaign_id, order_id, for_update=True)
            if conversion is None:
                raise NotFound(f"order {order_id!r} of campaign {campaign_id!r} not found")
            if conversion.status != "flagged":
                raise FailedPrecondition(f"only a flagged conversion can be reviewed; this one is {conversion.status}")
            if approve:
                status: ConversionStatus = (
                    "approved" if conversion.hold_until is None or conversion.hold_until <= now else "pending"
                )
                payout = conversion.payout_micros
            else:
                status = "rejected"
                payout = 0
                await self._give_back(conn, conversion, campaign, reason="review_rejected", consume_unique=False)
            await store.update_state(
                conn, conversion.id, status=status, reasons=conversion.reasons,
                refunded_micros=conversion.refunded_micros, payout_micros=payout, released=not approve,
                needs_rescore=False, fraud_score=conversion.fraud_score, hold_until=conversion.hold_until,
            )
            await store.insert_events(conn, [store.EventRow(conversion.id, ConversionEvent(
                from_status="flagged", to_status=status, at=now,
                reason="review_approved" if approve else "review_rejected", actor="reviewer", note=note,
            ))])
            return await self._reload(conn, conversion.id, campaign_id, order_id)

    # ------------------------------------------------------------ approval

    async def approve_due(self, limit: int = 500) -> int:
        """Approves PENDING conversions whose hold has passed; safe on many replicas."""
        now = self.clock()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                due = await store.lock_due_pending(conn, now, limit)
                if due:
                    await lifecycle_store.set_status(conn, [c.id for c in due], "approved")
                    await store.insert_events(conn, [
                        store.EventRow(c.id, ConversionEvent(
                            from_status="pending", to_status="approved", at=now, reason="hold_passed",
                            actor="system",
                        ))
                        for c in due
                    ])
            oldest = await store.oldest_due_pending(conn, now)
        APPROVED_TOTAL.inc(len(due))
        APPROVAL_LAG_SECONDS.set((now - oldest).total_seconds() if oldest else 0.0)
        return len(due)

    async def approve_all_due(self, batch: int = 500) -> int:
        """Catches up after downtime: approves batches until none is full."""
        total = 0
        while True:
            approved = await self.approve_due(batch)
            total += approved
            if approved < batch:
                return total

    # ------------------------------------------------------------ re-scoring

    async def rescore(self, round_size: int = RESCORE_ROUND) -> int:
        """Checks again the conversions flagged only because fraud was unavailable.

        Works through the backlog round after round while rounds come back
        full and the fraud service answers every check (so an outage's
        backlog clears at the speed of the batches, not one round per job
        interval), paced to at most ``rescore_per_second`` so that live
        clicks and postbacks keep their latency. A round is one
        read of candidates, their clicks in one query, one batched fraud call
        outside any transaction, then one short transaction that applies
        every verdict but the rejections under the orders' locks; a rejection
        gives its uses back in a transaction of its own, in the recording
        path's lock order. Answers how many conversions changed.
        """
        changed = 0
        while True:
            started = time.monotonic()
            round_changed, go_on = await self._rescore_round(round_size)
            changed += round_changed
            if not go_on:
                return changed
            await asyncio.sleep(max(0.0, round_size / self._rescore_per_second - (time.monotonic() - started)))

    async def _rescore_round(self, round_size: int) -> tuple[int, bool]:
        now = self.clock()
        candidates = await store.rescore_candidates(self._pool, round_size)
        if not candidates:
            return 0, False
        async with self._pool.acquire() as conn:
            requests = await self._fraud_requests(conn, candidates)
        verdicts = await self._fraud.check_conversions(requests)
        answered: list[tuple[Conversion, fraud_pb2.Verdict]] = []
        rejected: list[tuple[Conversion, fraud_pb2.Verdict]] = []
        for candidate, verdict in zip(candidates, verdicts, strict=True):
            if verdict is None:
                RESCORED_TOTAL.labels("unavailable").inc()
            elif verdict.action == fraud_pb2.VERDICT_ACTION_REJECT:
                rejected.append((candidate, verdict))
            else:
                answered.append((candidate, verdict))
        changed = await retry_aborted(lambda: self._apply_rescores(answered, now), "re-scoring round")
        for candidate, verdict in rejected:
            changed += await self._reject_rescored(candidate, verdict, now)
        unanswered = len(answered) + len(rejected) < len(candidates)
        return changed, len(candidates) == round_size and not unanswered

    async def _apply_rescores(self, answered: list[tuple[Conversion, fraud_pb2.Verdict]], now: datetime) -> int:
        if not answered:
            return 0
        rows: list[store.Rescore] = []
        events: list[store.EventRow] = []
        for candidate, verdict in answered:
            outcome = rescore_outcome(candidate.reasons, candidate.hold_until, verdict.action,
                                      fraud_reasons(verdict), now)
            rows.append(store.Rescore(candidate.id, outcome.status, outcome.reasons, verdict.score))
            events.append(store.EventRow(candidate.id, ConversionEvent(
                from_status="flagged", to_status=outcome.status, at=now, reason="rescored", actor="system",
                note=",".join(s.code for s in verdict.signals),
            )))
        async with self._pool.acquire() as conn, conn.transaction():
            # The orders' locks, as every change of a conversion takes them;
            # set_rescored then skips any that a person or a refund changed
            # since the candidates were read.
            await store.lock_orders(conn, [(c.campaign_id, c.order_id) for c, _ in answered])
            changed = await store.set_rescored(conn, rows)
            await store.insert_events(conn, [e for e in events if e.conversion_id in changed])
        for row in rows:
            if row.conversion_id in changed:
                RESCORED_TOTAL.labels(row.status).inc()
        return len(changed)

    async def _reject_rescored(self, candidate: Conversion, verdict: fraud_pb2.Verdict, now: datetime) -> bool:
        rejected = await retry_aborted(lambda: self._reject_rescored_once(candidate, verdict, now), "re-scoring")
        if rejected:  # counted once committed: an aborted attempt is tried again
            RESCORED_TOTAL.labels("rejected").inc()
        return rejected

    async def _reject_rescored_once(self, candidate: Conversion, verdict: fraud_pb2.Verdict, now: datetime) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            await store.lock_orders(conn, [(candidate.campaign_id, candidate.order_id)])
            conversion = await store.get_by_order(conn, candidate.campaign_id, candidate.order_id, for_update=True)
            if conversion is None or conversion.status != "flagged" or not conversion.needs_rescore:
                return False
            outcome = rescore_outcome(conversion.reasons, conversion.hold_until, verdict.action,
                                      fraud_reasons(verdict), now)
            campaign = await self._campaign(conversion.campaign_id, conn)
            await self._give_back(conn, conversion, campaign, reason="fraud_rescore", consume_unique=False)
            await store.update_state(
                conn, conversion.id, status=outcome.status, reasons=outcome.reasons,
                refunded_micros=conversion.refunded_micros, payout_micros=0, released=True,
                needs_rescore=False, fraud_score=verdict.score, hold_until=conversion.hold_until,
            )
            await store.insert_events(conn, [store.EventRow(conversion.id, ConversionEvent(
                from_status="flagged", to_status=outcome.status, at=now, reason="rescored", actor="system",
                note=",".join(s.code for s in verdict.signals),
            ))])
            return True

    async def _fraud_requests(
        self, conn: Connection, candidates: list[Conversion]
    ) -> list[fraud_pb2.CheckConversionRequest]:
        """The fraud checks of a round: codes from the cache, the named clicks' times in one query."""
        click_keys = [(c.click_id, c.click_created_at) for c in candidates if c.click_id and c.click_created_at]
        clicks = await click_store.fetch_clicks(conn, click_keys) if click_keys else {}
        requests = []
        for c in candidates:
            coupon = await self._cache.coupon(c.campaign_id, c.coupon_code, conn) if c.coupon_code else None
            click = clicks.get(c.click_id) if c.click_id else None
            requests.append(conversion_check(
                order_id=c.order_id,
                campaign_id=c.campaign_id,
                affiliate_id=c.affiliate_id,
                click_id=c.click_id,
                click_time=click.occurred_at if click else None,
                coupon_code=c.coupon_code,
                coupon_kind=coupon.kind if coupon else None,
                customer_id=c.customer_id,
                ip=str(c.request.get("ip") or ""),
                user_agent=str(c.request.get("user_agent") or ""),
                occurred_at=c.occurred_at,
                received_at=c.received_at,
            ))
        return requests

    # ------------------------------------------------------------ leak response

    async def hold_leaked_code(self, campaign_id: str, code: str, detail: str) -> bool:
        """Puts an ACTIVE UNIQUE code on HOLD; True when it changed."""
        async with self._pool.acquire() as conn, conn.transaction():
            changed = await lifecycle_store.hold_unique_code(conn, campaign_id, code, detail)
        if changed:
            LEAK_HOLDS_TOTAL.inc()
            logger.warning("code %s of campaign %s put on HOLD after a leak alert", code, campaign_id)
        return changed


async def run_periodically(name: str, interval_seconds: float, step: Callable[[], Awaitable[object]]) -> None:
    """Runs ``step`` every interval, forever, surviving its failures."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; retrying in %.0fs", name, interval_seconds)
        raise_if_cancelling()
        await asyncio.sleep(interval_seconds)


# With no stored cursor (a new deployment), alerts of the last few minutes
# are still acted on (those raised while the service was starting), but not
# old ones that people may already have dealt with.
FIRST_START_LOOKBACK = timedelta(minutes=5)


def first_alert_cursor(now: datetime | None = None) -> str:
    """A Redis stream id just before ``now - FIRST_START_LOOKBACK``."""
    moment = (now or datetime.now(UTC)) - FIRST_START_LOOKBACK
    return f"{int(moment.timestamp() * 1000)}-0"


async def follow_alerts(
    lifecycle: Lifecycle,
    pool: asyncpg.Pool,
    channel: grpc.aio.Channel,
    internal_token: str | None,
    *,
    reconnect_seconds: float = 2.0,
) -> None:
    """Follows the fraud service's alert stream, resuming after the stored cursor."""
    stub = fraud_pb2_grpc.FraudServiceStub(channel)
    while True:
        try:
            after_id = await lifecycle_store.get_alert_cursor(pool, ALERT_CURSOR) or first_alert_cursor()
            stream = stub.WatchAlerts(
                fraud_pb2.WatchAlertsRequest(after_id=after_id), metadata=bearer_metadata(internal_token)
            )
            async for alert in stream:
                if alert.kind == fraud_pb2.ALERT_KIND_CODE_LEAK and alert.coupon_code:
                    await lifecycle.hold_leaked_code(
                        alert.campaign_id, coupon_rules.normalize_code(alert.coupon_code), alert.detail
                    )
                # A CODE_SPIKE never freezes a code: the fraud service sends
                # its conversions to review instead.
                await lifecycle_store.set_alert_cursor(pool, ALERT_CURSOR, alert.id)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.info("alert stream interrupted (%s); reconnecting", type(error).__name__)
        raise_if_cancelling()
        await asyncio.sleep(reconnect_seconds)
