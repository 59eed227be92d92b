"""How a conversion is judged: the six steps of ARCHITECTURE.md section 6.

Pure functions over records already loaded (campaign, click, coupon,
affiliates); the store and the fraud client do the I/O around them. Steps 1
and 2 (token, syntax, campaign exists) happen before a conversion is stored
and raise; steps 3 and 4 are ``judge_static``; step 5 (fraud) and step 6
(limits) feed ``final_status``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from services.attribution.common import coupon_rules
from services.attribution.common.models import (
    DIRECT_CHANNEL,
    Affiliate,
    AttributionSource,
    Campaign,
    Click,
    ConversionStatus,
    Coupon,
    DeviceType,
)
from services.attribution.common.reasons import (
    AFFILIATE_INACTIVE,
    CAMPAIGN_INACTIVE,
    CLICK_ALREADY_CONVERTED,
    CLICK_OUTSIDE_LOOKBACK,
    CLICK_REJECTED,
    CURRENCY_MISMATCH,
    FIXABLE_REASONS,
    FLAGGING_REASONS,
    POSTBACK_TOO_LATE,
    UNKNOWN_AFFILIATE,
    UNKNOWN_CLICK,
    UNKNOWN_COUPON,
    is_fraud,
    rejects,
    rejects_statically,
)

# A conversion may claim to have happened at most this far after we received it.
MAX_CLOCK_SKEW = timedelta(minutes=5)

@dataclass(frozen=True)
class ConversionInput:
    """A syntactically valid postback, normalized."""

    campaign_id: str
    order_id: str
    amount_micros: int
    discount_micros: int
    currency: str
    received_at: datetime
    occurred_at: datetime
    occurred_at_sent: bool
    click_id: str = ""
    coupon_code: str = ""  # normalized
    customer_id: str = ""
    ip: str = ""
    user_agent: str = ""
    country: str = ""
    device_type: DeviceType | None = None
    skus: tuple[str, ...] = ()

    @cached_property
    def fingerprint(self) -> bytes:
        """The content of the order as the shop sent it, for comparing re-posts."""
        content = {
            "campaign_id": self.campaign_id,
            "order_id": self.order_id,
            "amount": self.amount_micros,
            "discount": self.discount_micros,
            "currency": self.currency,
            "coupon": self.coupon_code,
            "click": self.click_id,
            "customer": self.customer_id,
            "skus": sorted(self.skus),
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at_sent else None,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()


@dataclass
class StaticJudgment:
    """The outcome of steps 3 and 4."""

    reasons: list[str]
    affiliate_id: str | None
    source: AttributionSource
    click: Click | None  # the eligible click, if any
    coupon: Coupon | None
    channel: str | None = None

    @property
    def rejected(self) -> bool:
        return any(rejects(reason) for reason in self.reasons)


def click_eligibility(
    click: Click | None, input: ConversionInput, campaign: Campaign
) -> tuple[Click | None, list[str]]:
    """Step 4's first part: is the named click eligible for credit?"""
    if not input.click_id:
        return None, []
    if click is None or click.campaign_id != campaign.id:
        return None, [UNKNOWN_CLICK]
    lookback = timedelta(days=campaign.click_lookback_days)
    if input.occurred_at - click.occurred_at > lookback or click.occurred_at - input.occurred_at > MAX_CLOCK_SKEW:
        return None, [CLICK_OUTSIDE_LOOKBACK]
    if click.decision == "rejected":
        return None, [CLICK_REJECTED]
    if campaign.max_conversions_per_click and click.conversions >= campaign.max_conversions_per_click:
        return None, [CLICK_ALREADY_CONVERTED]
    return click, []


def judge_static(
    input: ConversionInput,
    campaign: Campaign,
    click: Click | None,
    coupon: Coupon | None,
    affiliates: Mapping[str, Affiliate | None],
    *,
    missing_coupon_reason: str = UNKNOWN_COUPON,
) -> StaticJudgment:
    """Steps 3 and 4: campaign state and age, click, credit, affiliate, code rules.

    ``missing_coupon_reason`` is the word for a code the campaign does not
    have (``coupon_rules.missing_code_reason``: unknown or mistyped).

    ``affiliates`` holds every affiliate the credit may name (the click's and
    the code's owners), None for an unknown id.
    """
    reasons: list[str] = []
    if campaign.status != "active":
        reasons.append(CAMPAIGN_INACTIVE)
    if input.received_at - input.occurred_at > timedelta(days=campaign.click_lookback_days):
        reasons.append(POSTBACK_TOO_LATE)

    eligible_click, click_reasons = click_eligibility(click, input, campaign)
    reasons.extend(click_reasons)

    if input.coupon_code and coupon is None:
        reasons.append(missing_coupon_reason)
    credit = coupon_rules.credit(
        campaign.attribution_policy, coupon, eligible_click.affiliate_id if eligible_click else None
    )
    reasons.extend(credit.reasons)
    channel: str | None = None
    if credit.affiliate_id is not None:
        affiliate = affiliates.get(credit.affiliate_id)
        if affiliate is None:
            reasons.append(UNKNOWN_AFFILIATE)
        else:
            channel = affiliate.channel
            if affiliate.status != "active":
                reasons.append(AFFILIATE_INACTIVE)

    if coupon is not None:
        # The postback's country and device (sent, or derived from its IP and
        # user agent), else those of the click it is credited through.
        credited_click = eligible_click if credit.source == "click" else None
        order = coupon_rules.Order(
            occurred_at=input.occurred_at,
            amount_micros=input.amount_micros,
            discount_micros=input.discount_micros,
            currency=input.currency,
            customer_id=input.customer_id,
            country=input.country or (credited_click.country or "" if credited_click else ""),
            device_type=input.device_type or (credited_click.device_type if credited_click else None),
            skus=input.skus,
        )
        reasons.extend(
            coupon_rules.static_reasons(
                coupon, order, campaign_currency=campaign.currency, credited_channel=channel
            )
        )
    elif input.currency.upper() != campaign.currency.upper():
        reasons.append(CURRENCY_MISMATCH)

    return StaticJudgment(
        reasons=_unique(reasons),
        affiliate_id=credit.affiliate_id,
        source=credit.source,
        click=eligible_click if credit.source == "click" else None,
        coupon=coupon,
        channel=channel,
    )


def report_dimensions(input: ConversionInput, static: StaticJudgment) -> dict[str, str]:
    """What reports count a judged order under (migration 009 reads them into columns).

    Country and device: the postback's, else derived from its IP and user
    agent (the recorder derived both before judging), else the credited
    click's; the credited affiliate's channel when the order is judged
    (``direct`` when nobody is credited); the credited click's sub1.
    """
    click = static.click
    channel = DIRECT_CHANNEL if static.affiliate_id is None else static.channel or ""
    return {
        "country": input.country or (click.country or "" if click else ""),
        "device": input.device_type or (click.device_type or "" if click else ""),
        "channel": channel,
        "sub1": click.subs[0] if click else "",
    }


def is_fixable(reasons: Sequence[str]) -> bool:
    """A REJECTED order whose every rejecting reason the shop can fix."""
    rejecting = [r for r in reasons if rejects(r)]
    return bool(rejecting) and all(r in FIXABLE_REASONS for r in rejecting)


def final_status(reasons: Sequence[str], hold_days: int, *, fraud_rejected: bool = False) -> ConversionStatus:
    """The status a judged conversion gets, from all of its reasons.

    Fraud signals flag (a REVIEW verdict) unless the verdict rejected.
    """
    if fraud_rejected or any(rejects_statically(r) for r in reasons):
        return "rejected"
    if any(r in FLAGGING_REASONS or is_fraud(r) for r in reasons):
        return "flagged"
    return "approved" if hold_days == 0 else "pending"


def hold_until(input: ConversionInput, hold_days: int) -> datetime:
    """The hold runs from the later of occurred_at and received_at: backdating cannot shorten it."""
    return max(input.occurred_at, input.received_at) + timedelta(days=hold_days)


def _unique(reasons: list[str]) -> list[str]:
    return list(dict.fromkeys(reasons))
