"""Campaigns, affiliates and coupons between their protos and domain records.

``*_to_proto`` is what every servicer answers with (tracking and reports
included); ``*_from_proto`` builds the record to store from a request that
``catalog.rules`` has accepted, applying the contract's defaults
(UNSPECIFIED enums, unset optional fields, a UNIQUE code's limit of 1) and
normalization (upper-case codes, currencies and countries, lower-case
channels). Enumerations travel as the lowercase word after the proto enum's
prefix, which is also how PostgreSQL stores them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar, cast

from ascribe.attribution.v1 import attribution_pb2
from google.protobuf import timestamp_pb2

from services.attribution.catalog.rules import (
    effective_usage_limit,
    normalize_channel,
    normalize_country,
    normalize_currency,
)
from services.attribution.common.coupon_rules import normalize_code
from services.attribution.common.models import (
    DEFAULT_CLICK_LOOKBACK_DAYS,
    DEFAULT_HOLD_DAYS,
    DEFAULT_MAX_CONVERSIONS_PER_CLICK,
    Affiliate,
    Campaign,
    Coupon,
    CouponKind,
    CouponStatus,
    DeviceType,
)
from services.common.enum_words import EnumWords
from services.common.errors import InvalidArgument
from services.common.timestamps import set_timestamp

if TYPE_CHECKING:
    pass

W = TypeVar("W", bound=str)
V = TypeVar("V", bound=int)


_POLICIES = EnumWords(attribution_pb2.AttributionPolicy, "ATTRIBUTION_POLICY_")
_CAMPAIGN_STATUSES = EnumWords(attribution_pb2.CampaignStatus, "CAMPAIGN_STATUS_")
_AFFILIATE_STATUSES = EnumWords(attribution_pb2.AffiliateStatus, "AFFILIATE_STATUS_")
_KINDS = EnumWords(attribution_pb2.CouponKind, "COUPON_KIND_")
_COUPON_STATUSES = EnumWords(attribution_pb2.CouponStatus, "COUPON_STATUS_")
_DEVICES = EnumWords(attribution_pb2.DeviceType, "DEVICE_TYPE_")


# Public enum helpers for the tracking and report code.


def device_type_to_proto(device: DeviceType | None) -> attribution_pb2.DeviceType.ValueType:
    return _DEVICES.number(device) if device else attribution_pb2.DEVICE_TYPE_UNSPECIFIED


def device_type_from_proto(value: int) -> DeviceType | None:
    """None for DEVICE_TYPE_UNSPECIFIED (or a value this build does not know)."""
    word = _DEVICES.words.get(value)
    return cast(DeviceType, word) if word else None


def coupon_status_from_proto(value: int) -> CouponStatus | None:
    """None for COUPON_STATUS_UNSPECIFIED (e.g. ListCoupons' "any status")."""
    word = _COUPON_STATUSES.words.get(value)
    return cast(CouponStatus, word) if word else None


# Timestamps


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime (PostgreSQL keeps microseconds; nanoseconds are dropped)."""
    return stamp.ToDatetime(tzinfo=UTC)


def _optional_time(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return from_timestamp(stamp) if present else None


# Campaigns


def campaign_to_proto(campaign: Campaign, *, postback_token: str = "") -> attribution_pb2.Campaign:
    """The token is passed only by CreateCampaign and RotatePostbackToken: it is never stored."""
    message = attribution_pb2.Campaign(
        id=campaign.id,
        name=campaign.name,
        landing_url=campaign.landing_url,
        hold_days=campaign.hold_days,
        click_lookback_days=campaign.click_lookback_days,
        max_conversions_per_click=campaign.max_conversions_per_click,
        attribution_policy=_POLICIES.number(campaign.attribution_policy),
        payout_micros=campaign.payout_micros,
        payout_percent_bp=campaign.payout_percent_bp,
        currency=campaign.currency,
        postback_token=postback_token,
        reuse_unique_after_refund=campaign.reuse_unique_after_refund,
        status=_CAMPAIGN_STATUSES.number(campaign.status),
    )
    if campaign.created_at is not None:
        set_timestamp(message.created_at, campaign.created_at)
    return message


def campaign_from_proto(message: attribution_pb2.Campaign, *, campaign_id: str) -> Campaign:
    return Campaign(
        id=campaign_id,
        name=message.name.strip(),
        landing_url=message.landing_url,
        currency=normalize_currency(message.currency),
        hold_days=message.hold_days if message.HasField("hold_days") else DEFAULT_HOLD_DAYS,
        click_lookback_days=(
            message.click_lookback_days
            if message.HasField("click_lookback_days")
            else DEFAULT_CLICK_LOOKBACK_DAYS
        ),
        max_conversions_per_click=(
            message.max_conversions_per_click
            if message.HasField("max_conversions_per_click")
            else DEFAULT_MAX_CONVERSIONS_PER_CLICK
        ),
        attribution_policy=_POLICIES.word(message.attribution_policy, "coupon_first"),
        payout_micros=message.payout_micros,
        payout_percent_bp=message.payout_percent_bp,
        reuse_unique_after_refund=message.reuse_unique_after_refund,
        status=_CAMPAIGN_STATUSES.word(message.status, "active"),
    )


# Affiliates


def affiliate_to_proto(affiliate: Affiliate) -> attribution_pb2.Affiliate:
    message = attribution_pb2.Affiliate(
        id=affiliate.id,
        name=affiliate.name,
        channel=affiliate.channel,
        status=_AFFILIATE_STATUSES.number(affiliate.status),
    )
    if affiliate.created_at is not None:
        set_timestamp(message.created_at, affiliate.created_at)
    return message


def affiliate_from_proto(message: attribution_pb2.Affiliate, *, affiliate_id: str) -> Affiliate:
    return Affiliate(
        id=affiliate_id,
        name=message.name.strip(),
        channel=normalize_channel(message.channel),
        status=_AFFILIATE_STATUSES.word(message.status, "active"),
    )


# Coupons


def coupon_to_proto(coupon: Coupon) -> attribution_pb2.Coupon:
    message = attribution_pb2.Coupon(
        code=coupon.code,
        campaign_id=coupon.campaign_id,
        kind=_KINDS.number(coupon.kind),
        status=_COUPON_STATUSES.number(coupon.status),
        usage_limit=coupon.usage_limit,
        used=coupon.used,
        allow_all_affiliates=coupon.allow_all_affiliates,
        affiliate_ids=coupon.affiliate_ids,
        per_customer_limit=coupon.per_customer_limit,
        discount_percent_bp=coupon.discount_percent_bp,
        discount_micros=coupon.discount_micros,
        countries=coupon.countries,
        device_types=[_DEVICES.number(device) for device in coupon.device_types],
        channels=coupon.channels,
        skus=coupon.skus,
        min_order_micros=coupon.min_order_micros,
        assigned_customer_id=coupon.assigned_customer_id,
        batch_id=coupon.batch_id or "",
        assigned_affiliate_id=coupon.assigned_affiliate_id,
    )
    remaining = coupon.remaining
    if remaining is not None:
        message.remaining = remaining
    if coupon.valid_from is not None:
        set_timestamp(message.valid_from, coupon.valid_from)
    if coupon.valid_until is not None:
        set_timestamp(message.valid_until, coupon.valid_until)
    if coupon.created_at is not None:
        set_timestamp(message.created_at, coupon.created_at)
    return message


def coupon_from_proto(
    message: attribution_pb2.Coupon, *, kind: CouponKind | None = None, used: int = 0
) -> Coupon:
    """The record to store; ``kind`` overrides the message's (GenerateCodes' templates)."""
    stored_kind: CouponKind = _KINDS.word(message.kind, "general") if kind is None else kind
    return Coupon(
        campaign_id=message.campaign_id,
        code=normalize_code(message.code),
        kind=stored_kind,
        status=_COUPON_STATUSES.word(message.status, "active"),
        valid_from=_optional_time(message.valid_from, message.HasField("valid_from")),
        valid_until=_optional_time(message.valid_until, message.HasField("valid_until")),
        usage_limit=effective_usage_limit(_KINDS.number(stored_kind), message.usage_limit),
        used=used,
        allow_all_affiliates=message.allow_all_affiliates,
        affiliate_ids=tuple(message.affiliate_ids),
        per_customer_limit=message.per_customer_limit,
        discount_percent_bp=message.discount_percent_bp,
        discount_micros=message.discount_micros,
        countries=_unique(normalize_country(country) for country in message.countries),
        device_types=_unique(
            cast(DeviceType, _DEVICES.words[device])
            for device in message.device_types
            if device in _DEVICES.words
        ),
        channels=_unique(normalize_channel(channel) for channel in message.channels),
        skus=_unique(sku.strip() for sku in message.skus),
        min_order_micros=message.min_order_micros,
        assigned_customer_id=message.assigned_customer_id,
    )


def _unique(values: Iterable[W]) -> tuple[W, ...]:
    """Duplicates dropped, first-seen order kept."""
    return tuple(dict.fromkeys(values))


# Page tokens: opaque to callers, bound to the listing they came from so a
# token of one campaign's coupons cannot page through another's.


def encode_page_token(scope: str, last_key: str) -> str:
    raw = f"{scope}\x00{last_key}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str, scope: str, *, field: str = "page_token") -> str:
    """The last key of the previous page ('' for the first page)."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.one(field, "not a page token of this listing") from None
    token_scope, separator, last_key = raw.partition("\x00")
    if not separator or token_scope != scope or not last_key:
        raise InvalidArgument.one(field, "not a page token of this listing")
    return last_key
