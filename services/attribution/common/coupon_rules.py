"""Every rule about coupon codes and credit, as pure functions.

Clicks use ``click_tracking_reasons`` (does tracking of this code begin with
this click?); conversions use ``credit`` (who earns the sale: the table in
ARCHITECTURE.md section 6) and ``static_reasons`` (the code's own rules at the
moment of the order). Nothing here does I/O, so every rule is unit-tested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.attribution.common.code_check import CodeShape
from services.attribution.common.models import (
    DIRECT_CHANNEL,
    AttributionPolicy,
    AttributionSource,
    Coupon,
    DeviceType,
)
from services.attribution.common.reasons import (
    AFFILIATE_NOT_ALLOWED,
    BELOW_MIN_ORDER,
    COUPON_EXPIRED,
    COUPON_INACTIVE,
    COUPON_MISTYPED,
    COUPON_NOT_YET_VALID,
    COUPON_ON_HOLD,
    CURRENCY_MISMATCH,
    CUSTOMER_ID_REQUIRED,
    CUSTOMER_NOT_ASSIGNED,
    RESTRICTION_CHANNEL,
    RESTRICTION_COUNTRY,
    RESTRICTION_DEVICE,
    RESTRICTION_SKU,
    UNKNOWN_COUPON,
    USAGE_LIMIT_REACHED,
)
from services.common import limits

CODE_MIN_LENGTH = 3
CODE_PATTERN = re.compile(rf"^[A-Z0-9_-]{{{CODE_MIN_LENGTH},{limits.COUPON_CODE}}}$")
CODE_RULE = f"{CODE_MIN_LENGTH}..{limits.COUPON_CODE} characters of A-Z 0-9 - _ (case-insensitive)"


def normalize_code(code: str) -> str:
    """Codes are case-insensitive: stored and compared upper-case."""
    return code.strip().upper()


def is_valid_code(code: str) -> bool:
    return CODE_PATTERN.fullmatch(code) is not None


def missing_code_reason(code: str, shapes: Sequence[CodeShape]) -> str:
    """Why a code the campaign does not have is refused.

    ``coupon_mistyped`` when it has the prefix, length and alphabet of one of
    the campaign's generated batches but a check symbol that does not fit
    (someone typed a real code wrong), else ``unknown_coupon``. A well-formed
    code that is not stored stays ``unknown_coupon``: it was never issued.
    """
    if any(shape.is_mistyped(code) for shape in shapes):
        return COUPON_MISTYPED
    return UNKNOWN_COUPON


def status_reasons(coupon: Coupon) -> list[str]:
    if coupon.status == "active":
        return []
    if coupon.status == "hold":
        return [COUPON_ON_HOLD]
    return [COUPON_INACTIVE]


def validity_reasons(coupon: Coupon, at: datetime) -> list[str]:
    """``valid_from <= at < valid_until``: the end instant is already expired."""
    if coupon.valid_from is not None and at < coupon.valid_from:
        return [COUPON_NOT_YET_VALID]
    if coupon.valid_until is not None and at >= coupon.valid_until:
        return [COUPON_EXPIRED]
    return []


def owners(coupon: Coupon) -> tuple[str, ...]:
    """The affiliates a code belongs to (EXCLUSIVE, or a UNIQUE code with an owner)."""
    if coupon.kind == "general" or coupon.allow_all_affiliates:
        return ()
    return coupon.affiliate_ids


def is_owned(coupon: Coupon) -> bool:
    return coupon.kind in ("exclusive", "unique") and bool(owners(coupon))


def sole_selected_affiliate(coupon: Coupon | None) -> str | None:
    """The one affiliate a GENERAL code was handed to, if it names exactly one.

    With one selected affiliate there is no doubt whose code it is, so a sale
    with the code and no click credits that affiliate, as an EXCLUSIVE code
    would; with all affiliates, or two or more, nobody can be told apart.
    """
    if coupon is None or coupon.kind != "general" or coupon.allow_all_affiliates:
        return None
    return coupon.affiliate_ids[0] if len(coupon.affiliate_ids) == 1 else None


def affiliate_may_carry(coupon: Coupon, affiliate_id: str) -> bool:
    """May this affiliate carry the code on its links and be credited through it?

    Every affiliate may when the code allows all, or when it names nobody (a
    public GENERAL code, a personal UNIQUE code sent by email); otherwise only
    the selected affiliates may.
    """
    if coupon.allow_all_affiliates or not coupon.affiliate_ids:
        return True
    return affiliate_id in coupon.affiliate_ids


def click_tracking_reasons(
    coupon: Coupon | None,
    affiliate_id: str,
    at: datetime,
    country: str = "",
    device_type: DeviceType | None = None,
    *,
    missing_reason: str = UNKNOWN_COUPON,
) -> list[str]:
    """Why coupon tracking does not begin with this click (empty: it does).

    The code's country and device rules apply as they do to its orders, but
    a visitor whose country or device is unknown is not turned away from the
    code: only one known to be excluded is. ``missing_reason`` is the word
    for a code the campaign does not have (``missing_code_reason``).
    """
    if coupon is None:
        return [missing_reason]
    reasons = status_reasons(coupon) + validity_reasons(coupon, at)
    if not affiliate_may_carry(coupon, affiliate_id):
        reasons.append(AFFILIATE_NOT_ALLOWED)
    if coupon.countries and country and country not in coupon.countries:
        reasons.append(RESTRICTION_COUNTRY)
    if coupon.device_types and device_type is not None and device_type not in coupon.device_types:
        reasons.append(RESTRICTION_DEVICE)
    if coupon.remaining == 0:
        reasons.append(USAGE_LIMIT_REACHED)
    return reasons


@dataclass(frozen=True)
class Credit:
    """Who earns a conversion, and through what."""

    affiliate_id: str | None
    source: AttributionSource
    reasons: tuple[str, ...] = ()


def credit(
    policy: AttributionPolicy,
    coupon: Coupon | None,
    click_affiliate_id: str | None,
) -> Credit:
    """The credit table of ARCHITECTURE.md section 6.

    ``coupon`` is the postback's code (None: no code, or an unknown one);
    ``click_affiliate_id`` the affiliate of the eligible click (None: no
    eligible click).
    """
    if coupon is None or not is_owned(coupon):
        if click_affiliate_id is None:
            sole = sole_selected_affiliate(coupon)
            return Credit(sole, "coupon") if sole else Credit(None, "none")
        if coupon is not None and not affiliate_may_carry(coupon, click_affiliate_id):
            return Credit(click_affiliate_id, "click", (AFFILIATE_NOT_ALLOWED,))
        return Credit(click_affiliate_id, "click")
    code_owners = owners(coupon)
    if click_affiliate_id is None:
        return Credit(code_owners[0], "coupon")
    if click_affiliate_id in code_owners:
        return Credit(click_affiliate_id, "click")
    if policy == "click_first":
        return Credit(click_affiliate_id, "click")
    return Credit(code_owners[0], "coupon")


@dataclass(frozen=True)
class Order:
    """What the static rules look at in a conversion."""

    occurred_at: datetime
    amount_micros: int
    discount_micros: int
    currency: str
    customer_id: str
    country: str
    device_type: DeviceType | None
    skus: tuple[str, ...]


def static_reasons(
    coupon: Coupon,
    order: Order,
    *,
    campaign_currency: str,
    credited_channel: str | None,
) -> list[str]:
    """The code's own rules at the time of the order; every failure is listed.

    ``credited_channel`` is the credited affiliate's channel, None when the
    sale is credited to nobody (then the channel is ``direct``).
    """
    reasons = status_reasons(coupon) + validity_reasons(coupon, order.occurred_at)
    if coupon.assigned_customer_id and order.customer_id != coupon.assigned_customer_id:
        reasons.append(CUSTOMER_NOT_ASSIGNED)
    if coupon.countries and order.country.upper() not in coupon.countries:
        reasons.append(RESTRICTION_COUNTRY)
    if coupon.device_types and order.device_type not in coupon.device_types:
        reasons.append(RESTRICTION_DEVICE)
    channel = credited_channel if credited_channel is not None else DIRECT_CHANNEL
    if coupon.channels and channel not in coupon.channels:
        reasons.append(RESTRICTION_CHANNEL)
    if coupon.skus and not _intersects(coupon.skus, order.skus):
        reasons.append(RESTRICTION_SKU)
    # The minimum applies to the order before its discount.
    if coupon.min_order_micros and order.amount_micros + order.discount_micros < coupon.min_order_micros:
        reasons.append(BELOW_MIN_ORDER)
    if order.currency.upper() != campaign_currency.upper():
        reasons.append(CURRENCY_MISMATCH)
    if coupon.per_customer_limit and not order.customer_id:
        reasons.append(CUSTOMER_ID_REQUIRED)
    return reasons


def _intersects(allowed: Iterable[str], present: Iterable[str]) -> bool:
    allowed_set = {sku.upper() for sku in allowed}
    return any(sku.upper() in allowed_set for sku in present)


def payout_micros(amount_micros: int, payout_fixed_micros: int, payout_percent_bp: int) -> int:
    """The campaign's fixed payout, or its percentage of the (net) amount."""
    if payout_percent_bp:
        return amount_micros * payout_percent_bp // 10_000
    return payout_fixed_micros
