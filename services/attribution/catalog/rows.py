"""Catalog columns and the records built from their rows, shared by every query."""

from __future__ import annotations

from typing import Any

import asyncpg

from services.attribution.common.models import Affiliate, Campaign, Coupon

CAMPAIGN_COLUMNS = """id, name, landing_url, currency, hold_days, click_lookback_days,
    max_conversions_per_click, attribution_policy, payout_micros, payout_percent_bp,
    reuse_unique_after_refund, status, created_at, postback_token_sha256"""
AFFILIATE_COLUMNS = "id, name, channel, status, created_at"
COUPON_COLUMNS = """campaign_id, code, kind, status, valid_from, valid_until, usage_limit, used,
    allow_all_affiliates, affiliate_ids, per_customer_limit, discount_percent_bp, discount_micros,
    countries, device_types, channels, skus, min_order_micros, assigned_customer_id, batch_id,
    created_at, assigned_affiliate_id"""

_ARRAY_FIELDS = ("affiliate_ids", "countries", "device_types", "channels", "skus")


def campaign_from_row(row: asyncpg.Record) -> Campaign:
    return Campaign(**dict(row))


def affiliate_from_row(row: asyncpg.Record) -> Affiliate:
    return Affiliate(**dict(row))


def coupon_from_row(row: asyncpg.Record) -> Coupon:
    values: dict[str, Any] = dict(row)
    for name in _ARRAY_FIELDS:
        values[name] = tuple(values[name] or ())
    return Coupon(**values)
