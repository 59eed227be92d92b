"""Would a conversion with this code and cart be accepted? Pure, from records already loaded.

The checkout asks before the customer pays, so the answer is the judgment's
static steps (``conversions.rules.judge_static``: campaign, click, credit,
affiliate, the code's own rules) plus the limits step 6 would apply (uses
left, the customer's uses), read and not taken. The reasons are the words
the conversion would get, from the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from services.attribution.common import coupon_rules
from services.attribution.common.models import Affiliate, Campaign, Click, Coupon, DeviceType
from services.attribution.common.reasons import CUSTOMER_LIMIT_REACHED, USAGE_LIMIT_REACHED
from services.attribution.conversions.rules import ConversionInput, final_status, judge_static


@dataclass(frozen=True)
class CheckoutInput:
    """A syntactically valid ValidateCoupon request, normalized."""

    campaign_id: str
    code: str  # normalized
    at: datetime  # the server's clock: the order would happen now
    amount_micros: int  # the cart subtotal, before the discount
    currency: str
    customer_id: str = ""
    skus: tuple[str, ...] = ()
    country: str = ""
    device_type: DeviceType | None = None
    ip: str = ""  # the customer's address (the request's ip, else the caller's peer)
    user_agent: str = ""
    affiliate_id: str = ""
    click_id: str = ""


@dataclass(frozen=True)
class CheckoutJudgment:
    valid: bool
    reasons: tuple[str, ...]
    coupon: Coupon | None


def as_conversion(item: CheckoutInput) -> ConversionInput:
    """The order the checkout is about to place, as a postback would report it.

    A postback's ``amount`` is after the discount and the minimum order is
    checked on amount + discount; the cart subtotal is before it, so it goes
    in whole with no discount.
    """
    return ConversionInput(
        campaign_id=item.campaign_id,
        order_id="",
        amount_micros=item.amount_micros,
        discount_micros=0,
        currency=item.currency,
        received_at=item.at,
        occurred_at=item.at,
        occurred_at_sent=False,
        click_id=item.click_id,
        coupon_code=item.code,
        customer_id=item.customer_id,
        ip=item.ip,
        user_agent=item.user_agent,
        country=item.country,
        device_type=item.device_type,
        skus=item.skus,
    )


def judge_checkout(
    item: CheckoutInput,
    campaign: Campaign,
    click: Click | None,
    coupon: Coupon | None,
    affiliates: Mapping[str, Affiliate | None],
    *,
    missing_coupon_reason: str,
    customer_uses: int,
) -> CheckoutJudgment:
    """Steps 3 and 4 of the judgment, and step 6's limits as they stand, without taking a use.

    ``customer_uses``: the customer's live uses of the code (0 without a
    customer or a per-customer limit). ``affiliate_id`` without a click is
    judged as that affiliate's click would be (the credit table's
    ``affiliate_not_allowed``); a click that is named wins.
    """
    static = judge_static(
        as_conversion(item), campaign, click, coupon, affiliates, missing_coupon_reason=missing_coupon_reason
    )
    reasons = list(static.reasons)
    if coupon is not None:
        if item.affiliate_id and static.click is None and not item.click_id:
            credit = coupon_rules.credit(campaign.attribution_policy, coupon, item.affiliate_id)
            reasons.extend(r for r in credit.reasons if r not in reasons)
        if coupon.remaining == 0:
            reasons.append(USAGE_LIMIT_REACHED)
        if coupon.per_customer_limit and item.customer_id and customer_uses >= coupon.per_customer_limit:
            reasons.append(CUSTOMER_LIMIT_REACHED)
    return CheckoutJudgment(
        valid=final_status(reasons, 1) != "rejected",
        reasons=tuple(reasons),
        coupon=coupon,
    )
