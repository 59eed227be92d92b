"""The attribution service's domain records, as stored and as judged.

Plain frozen dataclasses: the store builds them from rows, the rules read
them, the servicers translate them to and from protos. Enumerations are the
lowercase words stored in PostgreSQL (the proto enum name after its prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

AttributionPolicy = Literal["coupon_first", "click_first"]
CampaignStatus = Literal["active", "paused", "ended"]
AffiliateStatus = Literal["active", "paused"]
CouponKind = Literal["general", "exclusive", "unique"]
CouponStatus = Literal["active", "pending", "rejected", "hold", "paused"]
DeviceType = Literal["mobile", "desktop", "tablet", "other"]
ClickDecision = Literal["accepted", "flagged", "rejected"]
ConversionStatus = Literal["pending", "approved", "rejected", "reversed", "flagged"]
AttributionSource = Literal["click", "coupon", "none"]
ExperimentArm = Literal["treatment", "control"]  # issue #17

DEFAULT_HOLD_DAYS = 30
DEFAULT_CLICK_LOOKBACK_DAYS = 30
DEFAULT_MAX_CONVERSIONS_PER_CLICK = 1
DIRECT_CHANNEL = "direct"  # the channel of a sale credited to nobody


@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    landing_url: str
    currency: str
    hold_days: int = DEFAULT_HOLD_DAYS
    click_lookback_days: int = DEFAULT_CLICK_LOOKBACK_DAYS
    max_conversions_per_click: int = DEFAULT_MAX_CONVERSIONS_PER_CLICK
    attribution_policy: AttributionPolicy = "coupon_first"
    payout_micros: int = 0
    payout_percent_bp: int = 0
    reuse_unique_after_refund: bool = False
    status: CampaignStatus = "active"
    created_at: datetime | None = None
    # SHA-256 of the postback token; never shown, compared in constant time.
    postback_token_sha256: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Affiliate:
    id: str
    name: str
    channel: str = ""
    status: AffiliateStatus = "active"
    created_at: datetime | None = None


@dataclass(frozen=True)
class Coupon:
    campaign_id: str
    code: str  # normalized: upper-case
    kind: CouponKind = "general"
    status: CouponStatus = "active"
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    usage_limit: int = 0  # 0: unlimited
    used: int = 0
    allow_all_affiliates: bool = False
    affiliate_ids: tuple[str, ...] = ()  # the first is the primary owner
    per_customer_limit: int = 0
    discount_percent_bp: int = 0
    discount_micros: int = 0
    countries: tuple[str, ...] = ()
    device_types: tuple[DeviceType, ...] = ()
    channels: tuple[str, ...] = ()
    skus: tuple[str, ...] = ()
    min_order_micros: int = 0
    assigned_customer_id: str = ""
    batch_id: str | None = None
    created_at: datetime | None = None
    assigned_affiliate_id: str = ""  # AssignCode's affiliate (then affiliate_ids is just it)

    @property
    def remaining(self) -> int | None:
        """Uses left; None for an unlimited code."""
        return None if self.usage_limit == 0 else max(self.usage_limit - self.used, 0)


@dataclass(frozen=True)
class Click:
    click_id: str
    created_at: datetime
    campaign_id: str
    affiliate_id: str
    occurred_at: datetime
    decision: ClickDecision
    coupon_code: str | None = None
    requested_coupon_code: str | None = None
    external_click_id: str | None = None
    subs: tuple[str, str, str, str, str] = ("", "", "", "", "")
    ip: str | None = None
    user_agent: str | None = None
    referer: str | None = None
    country: str | None = None
    reasons: tuple[str, ...] = field(default_factory=tuple)
    fraud_score: int = 0
    conversions: int = 0
    device_type: DeviceType | None = None
    # Experiments (issue #17): the arm the click joined, if any.
    experiment_id: str | None = None
    experiment_arm: ExperimentArm | None = None
    experiment_unit: str | None = None
    unique: bool = True  # the visitor's first click for the campaign and affiliate in 24 h


@dataclass(frozen=True)
class ConversionEvent:
    """One transition in a conversion's append-only history."""

    from_status: ConversionStatus | None
    to_status: ConversionStatus
    at: datetime
    reason: str
    actor: str
    note: str = ""
    amount_micros: int = 0


@dataclass(frozen=True)
class Conversion:
    id: str
    campaign_id: str
    order_id: str
    status: ConversionStatus
    source: AttributionSource
    amount_micros: int
    currency: str
    received_at: datetime
    occurred_at: datetime
    fingerprint: bytes = field(default=b"", repr=False)
    reasons: tuple[str, ...] = ()
    affiliate_id: str | None = None
    click_id: str | None = None
    click_created_at: datetime | None = None
    coupon_code: str | None = None
    customer_id: str | None = None
    discount_micros: int = 0
    refunded_micros: int = 0
    payout_micros: int = 0
    hold_until: datetime | None = None
    coupon_remaining: int | None = None
    fraud_score: int = 0
    needs_rescore: bool = False
    holds_coupon_use: bool = False
    holds_customer_use: bool = False
    holds_click_slot: bool = False
    request: dict[str, object] = field(default_factory=dict, repr=False)
    history: tuple[ConversionEvent, ...] = ()
