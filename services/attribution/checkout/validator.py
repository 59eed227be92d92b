"""ValidateCoupon: proto <-> domain, the guard first, then the catalog (cached) and the judgment.

In this order, so that a guesser past the threshold costs no query at all:
syntax (INVALID_ARGUMENT naming the field), the guessing guard (local, no
call: RESOURCE_EXHAUSTED with the seconds to wait), the campaign and its
token (cached), then the code and what its rules need. A code the campaign
does not have is reported to the fraud service, whose answer may put its
sender on the guard's list.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from urllib.parse import unquote

import asyncpg
from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.catalog.cache import CatalogCache
from services.attribution.catalog.convert import device_type_from_proto
from services.attribution.catalog.store import postback_token_matches
from services.attribution.checkout import store
from services.attribution.checkout.guard import GuessGuard
from services.attribution.checkout.rules import CheckoutInput, CheckoutJudgment, judge_checkout
from services.attribution.clicks import store as click_store
from services.attribution.common import coupon_rules, ids
from services.attribution.common.batch_errors import error_proto
from services.attribution.common.models import Affiliate, Click, Coupon
from services.attribution.common.reasons import UNKNOWN_COUPON
from services.attribution.common.visitor import VisitorDerivation
from services.common import limits
from services.common.enum_words import EnumWords
from services.common.errors import (
    DomainError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Violations,
)
from services.common.grpc_server import token_matches
from services.common.ip import normalize_ip
from services.common.timestamps import set_timestamp, utcnow

logger = logging.getLogger(__name__)

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# grpc's peer: "ipv4:203.0.113.9:5000", "ipv6:[2001:db8::1]:5000" (or "unix:...": no address).
# gRPC core (1.85 here) percent-encodes the brackets: "ipv6:%5B2001:db8::1%5D:5000".
_PEER = re.compile(r"^ipv[46]:\[?([^\]]+?)\]?:\d+$")


def peer_ip(peer: str | None) -> str:
    """The caller's own address from grpc's peer string, canonical; "" when it has none."""
    match = _PEER.match(unquote(peer or ""))
    return (normalize_ip(match.group(1)) or "") if match else ""


def _text(v: Violations, field: str, value: str, limit: int, *, required: bool = False) -> str:
    value = value.strip()
    if required and not value:
        v.add(field, "is required")
    elif len(value.encode()) > limit:
        v.add(field, f"must be at most {limit} bytes")
    elif _CONTROL.search(value):
        v.add(field, "must not contain control characters")
    return value


def checkout_input(request: pb.ValidateCouponRequest, at: datetime, peer: str) -> CheckoutInput:
    """Syntax: every bad field named at once. The customer's address is ``ip``, else the peer's."""
    v = Violations()
    campaign_id = _text(v, "campaign_id", request.campaign_id, limits.CAMPAIGN_ID, required=True)
    code = coupon_rules.normalize_code(request.code)
    if not code:
        v.add("code", "is required")
    elif not coupon_rules.is_valid_code(code):
        v.add("code", coupon_rules.CODE_RULE)
    customer_id = _text(v, "customer_id", request.customer_id, limits.CUSTOMER_ID)
    if request.amount_micros < 0:
        v.add("amount_micros", "must not be negative")
    currency = request.currency.strip().upper()
    if not _CURRENCY.fullmatch(currency):
        v.add("currency", "must be a three-letter ISO 4217 code")
    if len(request.skus) > limits.SKUS_PER_ORDER:
        v.add("skus", f"at most {limits.SKUS_PER_ORDER} SKUs")
    elif any(not sku.strip() or len(sku.encode()) > limits.SKU or _CONTROL.search(sku) for sku in request.skus):
        v.add("skus", f"each SKU must be 1 to {limits.SKU} bytes of printable text")
    country = request.country.strip().upper()
    if country and not _COUNTRY.fullmatch(country):
        v.add("country", "must be an ISO 3166-1 alpha-2 code")
    if request.device_type not in pb.DeviceType.values():
        v.add("device_type", "unknown device type")
    ip = request.ip.strip()
    if ip:
        canonical = normalize_ip(ip)
        if canonical is None:
            v.add("ip", "must be an IPv4 or IPv6 address")
        ip = canonical or ""
    else:
        ip = peer
    user_agent = _text(v, "user_agent", request.user_agent, limits.USER_AGENT)
    affiliate_id = _text(v, "affiliate_id", request.affiliate_id, limits.AFFILIATE_ID)
    click_id = _text(v, "click_id", request.click_id, limits.CLICK_ID)
    if len(request.postback_token.encode()) > limits.POSTBACK_TOKEN:
        v.add("postback_token", f"must be at most {limits.POSTBACK_TOKEN} bytes")
    v.raise_if_any()
    return CheckoutInput(
        campaign_id=campaign_id,
        code=code,
        at=at,
        amount_micros=request.amount_micros,
        currency=currency,
        customer_id=customer_id,
        skus=tuple(sku.strip() for sku in request.skus),
        country=country,
        device_type=device_type_from_proto(request.device_type),
        ip=ip,
        user_agent=user_agent,
        affiliate_id=affiliate_id,
        click_id=click_id,
    )


_KINDS = EnumWords(pb.CouponKind, "COUPON_KIND_")


def response_proto(judgment: CheckoutJudgment) -> pb.ValidateCouponResponse:
    answer = pb.ValidateCouponResponse(valid=judgment.valid, reasons=judgment.reasons)
    coupon = judgment.coupon
    if coupon is not None:
        # What a checkout shows, not the code's whole rule set (its owners,
        # its assigned customer): the caller may hold only a shop's token.
        shown = answer.coupon
        shown.code = coupon.code
        shown.campaign_id = coupon.campaign_id
        shown.kind = _KINDS.number(coupon.kind)
        if coupon.remaining is not None:
            shown.remaining = coupon.remaining
        if coupon.valid_until is not None:
            set_timestamp(shown.valid_until, coupon.valid_until)
    return answer


class CheckoutValidator:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CatalogCache,
        guard: GuessGuard,
        *,
        admin_token: str | None,
        visitors: VisitorDerivation | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self.guard = guard
        self._admin_token = admin_token
        self._visitors = visitors or VisitorDerivation()
        self._clock = clock

    async def validate(
        self, request: pb.ValidateCouponRequest, bearer: str | None, peer: str | None
    ) -> pb.ValidateCouponResponse:
        item = checkout_input(request, self._clock(), peer_ip(peer))
        wait = self.guard.retry_after(item.campaign_id, item.ip, item.customer_id)
        if wait is not None:
            raise ResourceExhausted(
                "too many unknown codes from this customer; try again later", retry_after_seconds=wait
            )
        campaign = await self._cache.campaign(item.campaign_id)
        if campaign is None:
            raise NotFound(f"campaign {item.campaign_id!r} not found")
        if not self._authorized(request.postback_token, bearer, campaign.postback_token_sha256):
            raise Unauthenticated("missing or wrong postback token")
        # A country or device the shop did not send comes from the customer's
        # IP and user agent, as for a conversion.
        item = replace(
            item,
            country=item.country or self._visitors.country(item.ip),
            device_type=item.device_type or self._visitors.device(item.user_agent),
        )
        coupon = await self._cache.coupon(campaign.id, item.code)
        missing = UNKNOWN_COUPON
        if coupon is None:
            missing = coupon_rules.missing_code_reason(item.code, await self._cache.code_shapes(campaign.id))
        click = await self._click(item.click_id)
        affiliates = await self._affiliates(coupon, click)
        uses = 0
        if coupon is not None and coupon.per_customer_limit and item.customer_id:
            uses = await store.customer_uses(self._pool, campaign.id, coupon.code, item.customer_id)
        judgment = judge_checkout(
            item, campaign, click, coupon, affiliates, missing_coupon_reason=missing, customer_uses=uses
        )
        if coupon is None:
            # Waited for (bounded by the fraud deadline), so a guesser's next
            # try already meets the guard.
            await self.guard.missed(campaign.id, item.code, item.ip, item.customer_id)
        return response_proto(judgment)

    async def validate_batch(
        self, requests: Sequence[pb.ValidateCouponRequest], bearer: str | None, peer: str | None
    ) -> pb.ValidateCouponBatchResponse:
        """Each request validated as if alone (concurrently); a failure is its entry's own."""
        answers = await asyncio.gather(*(self.validate(r, bearer, peer) for r in requests), return_exceptions=True)
        results = []
        for answer in answers:
            if isinstance(answer, pb.ValidateCouponResponse):
                results.append(pb.ValidateCouponResult(response=answer))
            elif isinstance(answer, DomainError):
                result = pb.ValidateCouponResult(error=error_proto(answer))
                if isinstance(answer, ResourceExhausted) and answer.retry_after_seconds is not None:
                    result.retry_after_seconds = answer.retry_after_seconds
                results.append(result)
            elif isinstance(answer, Exception):
                # A failed lookup (the database, a bug) fails its entry, never the batch.
                logger.error("validation failed: %r", answer, exc_info=answer)
                results.append(pb.ValidateCouponResult(error=error_proto(Unavailable("validation failed; retry"))))
            else:
                raise answer  # cancellation
        return pb.ValidateCouponBatchResponse(results=results)

    def _authorized(self, postback_token: str, bearer: str | None, token_sha256: bytes) -> bool:
        """The campaign's postback token, or (without one) the admin token; no admin token set: open, as admin RPCs are."""
        if postback_token:
            return postback_token_matches(postback_token, token_sha256)
        return self._admin_token is None or token_matches(bearer, self._admin_token)

    async def _click(self, click_id: str) -> Click | None:
        if not click_id:
            return None
        try:
            created_at = ids.click_created_at(click_id)
        except ValueError:
            return None  # a malformed id names no click: unknown_click
        async with self._pool.acquire() as conn:
            return (await click_store.fetch_clicks(conn, [(click_id, created_at)])).get(click_id)

    async def _affiliates(self, coupon: Coupon | None, click: Click | None) -> dict[str, Affiliate | None]:
        candidates: Iterable[str] = set(coupon.affiliate_ids if coupon else ()) | ({click.affiliate_id} if click else set())
        return {a: await self._cache.affiliate(a) for a in sorted(candidates)}
