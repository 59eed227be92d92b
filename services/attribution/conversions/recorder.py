"""Recording conversions: judged, fraud-checked and committed in batches.

Concurrent postbacks are coalesced (``MicroBatcher``) into one transaction
per batch. Inside it, in this order (a fixed lock order, so batches on any
number of replicas never deadlock):

1. advisory locks on every order of the batch: concurrent copies of one order
   are serialized, so exactly one is judged, fraud-checked and can take a use;
2. orders already stored are answered (same content), refused (other
   content) or judged anew (rejected for a reason the shop can fix);
3. static judgment (``rules.judge_static``) from cached catalog records
   and the named clicks;
4. one batched fraud call for the conversions still standing;
5. limits: customer uses, click slots, then each code's counter, locked once
   per code per batch and moved by the uses granted (``redemptions``);
6. every row (conversions, history, ledger) written by one INSERT ... unnest
   statement, then commit.

Nothing is acknowledged before the commit, and a failure rolls the whole
batch back: a crash in the middle leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg
from ascribe.fraud.v1 import fraud_pb2

from services.attribution.catalog.cache import CatalogCache
from services.attribution.catalog.store import postback_token_matches
from services.attribution.checkout.guard import GuessGuard
from services.attribution.clicks import store as click_store
from services.attribution.common import coupon_rules, ids
from services.attribution.common.database import ATTEMPTS, DATABASE_UNAVAILABLE, Connection, retry_aborted
from services.attribution.common.models import Affiliate, Campaign, Click, Conversion, ConversionEvent, Coupon
from services.attribution.common.reasons import (
    COUPON_MISTYPED,
    CUSTOMER_LIMIT_REACHED,
    FRAUD_UNAVAILABLE,
    UNKNOWN_COUPON,
    USAGE_LIMIT_REACHED,
)
from services.attribution.common.visitor import VisitorDerivation
from services.attribution.conversions import redemptions, store
from services.attribution.conversions.rules import (
    ConversionInput,
    StaticJudgment,
    final_status,
    hold_until,
    is_fixable,
    judge_static,
    report_dimensions,
)
from services.attribution.fraud_client import FraudClient, conversion_check, fraud_reasons
from services.attribution.metrics import CONVERSION_BATCH_SIZE, CONVERSION_SECONDS, count_judged
from services.common.batcher import MicroBatcher
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.timestamps import utcnow

logger = logging.getLogger(__name__)




class _Rejudge(Exception):
    """A copy of an order that met its own earlier copy in one batch and must be judged anew."""


class _Deferred(Exception):
    """An order naming a click another order of the same batch names: it goes in the next batch.

    A click's slots are then decided one batch at a time, so a slot that one
    order gives back (rejected late in its batch) is seen by the next order.
    """


@dataclass
class _Case:
    """One order being judged in a batch."""

    input: ConversionInput
    campaign: Campaign
    previous: Conversion | None
    static: StaticJudgment | None = None
    reasons: list[str] | None = None
    fraud_rejected: bool = False
    fraud_score: int = 0
    needs_rescore: bool = False
    customer_use: bool = False
    click_slot: bool = False
    coupon_use: bool = False
    coupon_remaining: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.input.campaign_id, self.input.order_id)

    def standing(self) -> bool:
        assert self.reasons is not None
        return final_status(self.reasons, 1, fraud_rejected=self.fraud_rejected) != "rejected"


class ConversionRecorder:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CatalogCache,
        fraud: FraudClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        visitors: VisitorDerivation | None = None,
        max_batch: int = 128,
        max_in_flight: int = 4,
        guard: GuessGuard | None = None,
    ) -> None:
        self._pool = pool
        self._guard = guard
        self._cache = cache
        self._fraud = fraud
        self.clock = clock
        self._visitors = visitors or VisitorDerivation()
        self._batcher: MicroBatcher[ConversionInput, Conversion] = MicroBatcher(
            self._flush, max_batch=max_batch, max_in_flight=max_in_flight,
            size_histogram=CONVERSION_BATCH_SIZE, name="conversions",
        )

    async def authorize(self, campaign_id: str, token: str) -> Campaign:
        """Step 1's token and step 2: the campaign exists and the token is its own."""
        campaign = await self._cache.campaign(campaign_id)
        if campaign is None:
            raise NotFound(f"campaign {campaign_id!r} not found")
        if not postback_token_matches(token, campaign.postback_token_sha256):
            raise Unauthenticated("missing or wrong postback token")
        return campaign

    async def record(self, input: ConversionInput) -> Conversion:
        """Judges and commits one conversion (batched with concurrent ones)."""
        # A country or device the shop did not send comes from the customer's
        # IP and user agent (neither is part of the order's content).
        input = replace(
            input,
            country=input.country or self._visitors.country(input.ip),
            device_type=input.device_type or self._visitors.device(input.user_agent),
        )
        with CONVERSION_SECONDS.time():
            rejudged = 0
            while True:
                try:
                    return await self._batcher.submit(input)
                except _Deferred:
                    continue  # another order on the same click went first; each batch makes progress
                except _Rejudge:
                    rejudged += 1
                    if rejudged >= ATTEMPTS:
                        raise Unavailable("the order kept changing while it was judged; retry") from None

    async def record_many(self, inputs: Sequence[ConversionInput]) -> list[Conversion | BaseException]:
        results = await asyncio.gather(*(self.record(i) for i in inputs), return_exceptions=True)
        return list(results)

    async def close(self) -> None:
        await self._batcher.close()

    # ------------------------------------------------------------ the batch

    async def _flush(self, inputs: Sequence[ConversionInput]) -> list[Conversion | BaseException]:
        verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None] = {}
        try:
            return await retry_aborted(lambda: self._flush_once(inputs, verdicts), "conversion batch")
        except asyncpg.DataError as error:
            if len(inputs) == 1:
                raise InvalidArgument.one("request", f"a value cannot be stored: {error}") from error
            # One bad value must not fail its neighbours: judge each alone.
            return [result for item in inputs for result in await self._flush_alone(item, verdicts)]
        except DATABASE_UNAVAILABLE as error:
            raise Unavailable("the database is unavailable; the conversion was not recorded") from error

    async def _flush_alone(
        self, item: ConversionInput, verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None]
    ) -> list[Conversion | BaseException]:
        """One item in a transaction of its own: its failure is its own."""
        try:
            return await self._flush_once([item], verdicts)
        except asyncpg.DataError as error:
            return [InvalidArgument.one("request", f"a value cannot be stored: {error}")]
        except Exception as error:  # handed to this item's caller alone
            return [error]

    async def _flush_once(
        self,
        inputs: Sequence[ConversionInput],
        verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None],
    ) -> list[Conversion | BaseException]:
        results: list[Conversion | BaseException | None] = [None] * len(inputs)
        leaders: dict[tuple[str, str], int] = {}
        followers: list[int] = []
        for index, item in enumerate(inputs):
            key = (item.campaign_id, item.order_id)
            if key in leaders:
                followers.append(index)
            else:
                leaders[key] = index

        async with self._pool.acquire() as conn, conn.transaction():
            existing = await store.lock_and_fetch_orders(conn, list(leaders))
            cases: list[tuple[int, _Case]] = []
            clicks_in_batch: set[str] = set()
            for key, index in leaders.items():
                item = inputs[index]
                previous = existing.get(key)
                if previous is not None:
                    if previous.fingerprint == item.fingerprint:
                        results[index] = previous
                        continue
                    if not (previous.status == "rejected" and is_fixable(previous.reasons)):
                        results[index] = _conflict(item)
                        continue
                campaign = await self._cache.campaign(item.campaign_id, conn)
                if campaign is None:
                    results[index] = NotFound(f"campaign {item.campaign_id!r} not found")
                    continue
                if item.click_id and campaign.max_conversions_per_click:
                    if item.click_id in clicks_in_batch:
                        results[index] = _Deferred()
                        continue
                    clicks_in_batch.add(item.click_id)
                cases.append((index, _Case(item, campaign, previous)))
            if cases:
                judged = await self._judge(conn, [case for _, case in cases], verdicts)
                for (index, _), conversion in zip(cases, judged, strict=True):
                    results[index] = conversion

        if self._guard is not None:
            # A conversion with a code the campaign does not have never reaches
            # the fraud check (it is rejected first), so its miss is counted
            # against the customer's address and id on its own, once it is
            # committed (a retried batch counts nothing twice) and without
            # delaying the answer.
            for index, case in cases:
                outcome = results[index]
                if isinstance(outcome, Conversion) and (
                    UNKNOWN_COUPON in outcome.reasons or COUPON_MISTYPED in outcome.reasons
                ):
                    item = case.input
                    self._guard.missed_later(item.campaign_id, item.coupon_code, item.ip, item.customer_id)

        for index in followers:
            item = inputs[index]
            leader = results[leaders[(item.campaign_id, item.order_id)]]
            stored = existing.get((item.campaign_id, item.order_id))
            if not isinstance(leader, Conversion):
                # The leader was refused (e.g. other content): this copy may
                # still be the stored order itself.
                results[index] = stored if stored and stored.fingerprint == item.fingerprint else leader
            elif leader.fingerprint == item.fingerprint:
                results[index] = leader
            elif leader.status == "rejected" and is_fixable(leader.reasons):
                results[index] = _Rejudge()
            else:
                results[index] = _conflict(item)
        final = [r for r in results if r is not None]
        assert len(final) == len(inputs)
        return final

    async def _judge(
        self,
        conn: Connection,
        cases: list[_Case],
        verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None],
    ) -> list[Conversion]:
        clicks = await self._load_clicks(conn, cases)
        coupons = {
            (c.input.campaign_id, c.input.coupon_code): await self._cache.coupon(
                c.input.campaign_id, c.input.coupon_code, conn
            )
            for c in cases
            if c.input.coupon_code
        }
        for case in cases:
            await self._judge_statically(conn, case, clicks, coupons)

        await self._check_fraud([c for c in cases if c.standing()], verdicts)
        await self._take_limits(conn, [c for c in cases if c.standing()], clicks, coupons, verdicts)

        conversions = [self._conversion(case) for case in cases]
        new = [c for c, case in zip(conversions, cases, strict=True) if case.previous is None]
        events = [
            store.EventRow(conversion.id, ConversionEvent(
                from_status=case.previous.status if case.previous else None,
                to_status=conversion.status,
                at=conversion.received_at,
                reason="rejudged" if case.previous else "judged",
                actor="shop",
                note=",".join(conversion.reasons),
            ))
            for conversion, case in zip(conversions, cases, strict=True)
        ]
        ledger = [
            redemptions.LedgerRow(c.campaign_id, c.coupon_code or "", c.id, c.customer_id or None, c.received_at)
            for c in conversions
            if c.holds_coupon_use
        ]
        for conversion, case in zip(conversions, cases, strict=True):
            if case.previous is not None:
                await store.replace_conversion(conn, conversion)
        await store.insert_judged(conn, new, events, ledger)
        count_judged(conversions)
        return conversions

    async def _load_clicks(self, conn: Connection, cases: list[_Case]) -> dict[str, Click]:
        named: list[tuple[str, datetime]] = []
        for case in cases:
            if case.input.click_id:
                try:
                    named.append((case.input.click_id, ids.click_created_at(case.input.click_id)))
                except ValueError:
                    continue  # a malformed id names no click: unknown_click
        return await click_store.fetch_clicks(conn, named)

    async def _judge_statically(
        self,
        conn: Connection,
        case: _Case,
        clicks: dict[str, Click],
        coupons: dict[tuple[str, str], Coupon | None],
    ) -> None:
        item = case.input
        click = clicks.get(item.click_id)
        coupon = coupons.get((item.campaign_id, item.coupon_code)) if item.coupon_code else None
        candidates = set(coupon.affiliate_ids if coupon else ())
        if click is not None:
            candidates.add(click.affiliate_id)
        affiliates: dict[str, Affiliate | None] = {
            a: await self._cache.affiliate(a, conn) for a in sorted(candidates)
        }
        missing_reason = (
            coupon_rules.missing_code_reason(item.coupon_code, await self._cache.code_shapes(item.campaign_id, conn))
            if item.coupon_code and coupon is None
            else UNKNOWN_COUPON
        )
        static = judge_static(item, case.campaign, click, coupon, affiliates, missing_coupon_reason=missing_reason)
        case.static = static
        case.reasons = list(static.reasons)

    async def _check_fraud(
        self, cases: list[_Case], verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None]
    ) -> None:
        unchecked = [c for c in cases if c.key not in verdicts]
        if unchecked:
            results = await self._fraud.check_conversions([self._fraud_request(c) for c in unchecked])
            for case, verdict in zip(unchecked, results, strict=True):
                verdicts[case.key] = verdict
        for case in cases:
            assert case.reasons is not None
            verdict = verdicts[case.key]
            if verdict is None:
                case.reasons.append(FRAUD_UNAVAILABLE)
                case.needs_rescore = True
                continue
            case.fraud_score = verdict.score
            if verdict.action == fraud_pb2.VERDICT_ACTION_REJECT:
                case.fraud_rejected = True
                case.reasons.extend(fraud_reasons(verdict))
            elif verdict.action == fraud_pb2.VERDICT_ACTION_REVIEW:
                case.reasons.extend(fraud_reasons(verdict))

    def _fraud_request(self, case: _Case) -> fraud_pb2.CheckConversionRequest:
        item, static = case.input, case.static
        assert static is not None
        return conversion_check(
            order_id=item.order_id,
            campaign_id=item.campaign_id,
            affiliate_id=static.affiliate_id,
            click_id=static.click.click_id if static.click else None,
            click_time=static.click.occurred_at if static.click else None,
            coupon_code=item.coupon_code,
            coupon_kind=static.coupon.kind if static.coupon else None,
            customer_id=item.customer_id,
            ip=item.ip,
            user_agent=item.user_agent,
            occurred_at=item.occurred_at,
            received_at=item.received_at,
        )

    async def _take_limits(
        self,
        conn: Connection,
        cases: list[_Case],
        clicks: dict[str, Click],
        coupons: dict[tuple[str, str], Coupon | None],
        verdicts: dict[tuple[str, str], fraud_pb2.Verdict | None],
    ) -> None:
        """Step 6, in lock order: customer uses, click slots, then code counters."""
        def customer_row(case: _Case) -> tuple[str, str, str]:
            coupon = case.static.coupon if case.static else None
            return (coupon.campaign_id, coupon.code, case.input.customer_id) if coupon else ("", "", "")

        for case in sorted(cases, key=customer_row):  # the rows' own order, as every batch locks them
            coupon = case.static.coupon if case.static else None
            if coupon is not None and coupon.per_customer_limit:
                key = (coupon.campaign_id, coupon.code)
                if await redemptions.take_customer_use(conn, key, case.input.customer_id, coupon.per_customer_limit):
                    case.customer_use = True
                else:
                    assert case.reasons is not None
                    case.reasons.append(CUSTOMER_LIMIT_REACHED)

        for case in sorted(cases, key=lambda c: c.input.click_id):
            static = case.static
            if not case.standing() or static is None or static.click is None:
                continue
            if await click_store.take_click_slot(
                conn, static.click.click_id, static.click.created_at, case.campaign.max_conversions_per_click
            ):
                case.click_slot = True
            else:
                # The click reached its limit since it was read: judged anew
                # with the click as it now is (spent), the sale says
                # click_already_converted and goes on as if it had no click
                # (credit, channel and access anew).
                spent = static.click
                clicks[spent.click_id] = replace(spent, conversions=case.campaign.max_conversions_per_click)
                await self._judge_statically(conn, case, clicks, coupons)
                await self._check_fraud([case], verdicts)  # the verdict already given

        wanting = [c for c in cases if c.standing() and c.static is not None and c.static.coupon is not None]
        grants = await redemptions.grant_uses(
            conn, [(c.static.coupon.campaign_id, c.static.coupon.code) for c in wanting if c.static and c.static.coupon]
        )
        for case, grant in zip(wanting, grants, strict=True):
            assert case.reasons is not None
            if grant == redemptions.UNKNOWN_CODE:  # deleted since it was cached
                case.reasons.append(UNKNOWN_COUPON)
            elif grant is None:
                case.reasons.append(USAGE_LIMIT_REACHED)
                case.coupon_remaining = 0
            else:
                case.coupon_use = True
                case.coupon_remaining = None if grant == -1 else int(grant)

        # Whatever a conversion took before a later step rejected it goes back.
        for case in cases:
            if case.standing():
                continue
            coupon = case.static.coupon if case.static else None
            if case.customer_use and coupon is not None:
                await redemptions.release_customer_use(conn, (coupon.campaign_id, coupon.code), case.input.customer_id)
                case.customer_use = False
            if case.click_slot and case.static is not None and case.static.click is not None:
                await click_store.release_click_slot(conn, case.static.click.click_id, case.static.click.created_at)
                case.click_slot = False

    def _conversion(self, case: _Case) -> Conversion:
        item, static, campaign = case.input, case.static, case.campaign
        assert static is not None and case.reasons is not None
        status = final_status(case.reasons, campaign.hold_days, fraud_rejected=case.fraud_rejected)
        accepted = status != "rejected"
        coupon = static.coupon
        remaining = case.coupon_remaining
        if remaining is None and coupon is not None and coupon.usage_limit and not case.coupon_use:
            remaining = coupon.remaining
        return Conversion(
            id=case.previous.id if case.previous else ids.new_conversion_id(item.received_at),
            campaign_id=item.campaign_id,
            order_id=item.order_id,
            status=status,
            source=static.source,
            amount_micros=item.amount_micros,
            currency=item.currency,
            received_at=item.received_at,
            occurred_at=item.occurred_at,
            fingerprint=item.fingerprint,
            reasons=tuple(case.reasons),
            affiliate_id=static.affiliate_id,
            click_id=static.click.click_id if static.click else None,
            click_created_at=static.click.created_at if static.click else None,
            coupon_code=item.coupon_code or None,
            customer_id=item.customer_id or None,
            discount_micros=item.discount_micros,
            payout_micros=(
                coupon_rules.payout_micros(item.amount_micros, campaign.payout_micros, campaign.payout_percent_bp)
                if accepted and static.affiliate_id else 0
            ),
            hold_until=hold_until(item, campaign.hold_days) if accepted else None,
            coupon_remaining=remaining,
            fraud_score=case.fraud_score,
            needs_rescore=case.needs_rescore and accepted,
            holds_coupon_use=case.coupon_use and accepted,
            holds_customer_use=case.customer_use and accepted,
            holds_click_slot=case.click_slot and accepted,
            request=_request_json(item) | {"report": report_dimensions(item, static)},
        )


def _conflict(item: ConversionInput) -> AlreadyExists:
    return AlreadyExists(
        f"order {item.order_id!r} was already recorded with other content; "
        "use a new order id or send the same parameters"
    )


def _request_json(item: ConversionInput) -> dict[str, object]:
    """The shop's parameters, kept to re-score the conversion and to explain it."""
    return {
        "click_id": item.click_id,
        "coupon_code": item.coupon_code,
        "customer_id": item.customer_id,
        "ip": item.ip,
        "user_agent": item.user_agent,
        "country": item.country,
        "device_type": item.device_type,
        "skus": list(item.skus),
        "occurred_at_sent": item.occurred_at_sent,
    }
