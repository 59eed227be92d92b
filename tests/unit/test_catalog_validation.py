"""Catalog validation and conversion rules, without I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.attribution.catalog import rules
from services.attribution.catalog.convert import (
    campaign_from_proto,
    campaign_to_proto,
    coupon_from_proto,
    coupon_to_proto,
    decode_page_token,
    encode_page_token,
    from_timestamp,
)
from services.attribution.common import code_check
from services.attribution.common.models import Coupon
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.timestamps import to_timestamp


def _ts(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(text))
    return stamp


def _campaign(**fields: Any) -> pb.Campaign:
    values: dict[str, Any] = {
        "name": "Summer sale",
        "landing_url": "https://shop.example/summer?utm=1",
        "currency": "usd",
    }
    values.update(fields)
    return pb.Campaign(**values)


def _coupon(**fields: Any) -> pb.Coupon:
    values: dict[str, Any] = {"campaign_id": "cmp_1", "code": "summer25"}
    values.update(fields)
    return pb.Coupon(**values)


def _violations(call: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        call()  # type: ignore[operator]
    return dict(caught.value.violations)


# ---------------------------------------------------------------- campaigns


def test_a_good_campaign_passes() -> None:
    rules.validate_campaign(_campaign(payout_micros=5_000_000, hold_days=0))
    rules.validate_campaign(_campaign(id="my-campaign_1", payout_percent_bp=10_000))


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("campaign.id", {"id": "no spaces"}),
        ("campaign.id", {"id": "x" * 65}),
        ("campaign.name", {"name": ""}),
        ("campaign.name", {"name": "n" * 201}),
        ("campaign.landing_url", {"landing_url": ""}),
        ("campaign.landing_url", {"landing_url": "shop.example/landing"}),
        ("campaign.landing_url", {"landing_url": "javascript:alert(1)"}),
        ("campaign.landing_url", {"landing_url": "ftp://shop.example/"}),
        ("campaign.landing_url", {"landing_url": "https:///no-host"}),
        ("campaign.landing_url", {"landing_url": "https://shop.example:99999/"}),
        ("campaign.landing_url", {"landing_url": "https://shop.example/a b"}),
        ("campaign.hold_days", {"hold_days": -1}),
        ("campaign.click_lookback_days", {"click_lookback_days": 0}),
        ("campaign.max_conversions_per_click", {"max_conversions_per_click": -1}),
        ("campaign.payout_micros", {"payout_micros": -1}),
        ("campaign.payout_percent_bp", {"payout_percent_bp": 10_001}),
        ("campaign.payout_micros", {"payout_micros": 1, "payout_percent_bp": 1}),
        ("campaign.currency", {"currency": ""}),
        ("campaign.currency", {"currency": "ABC"}),
        ("campaign.currency", {"currency": "XAU"}),  # gold is not a shop's currency
        ("campaign.attribution_policy", {"attribution_policy": 7}),
        ("campaign.status", {"status": 9}),
    ],
)
def test_bad_campaign_fields(field: str, fields: dict[str, Any]) -> None:
    assert field in _violations(lambda: rules.validate_campaign(_campaign(**fields)))


def test_campaign_defaults_and_explicit_zero() -> None:
    defaults = campaign_from_proto(_campaign(), campaign_id="cmp_1")
    assert (defaults.hold_days, defaults.click_lookback_days, defaults.max_conversions_per_click) == (30, 30, 1)
    assert defaults.attribution_policy == "coupon_first"
    assert defaults.status == "active"
    assert defaults.currency == "USD"
    zeros = campaign_from_proto(_campaign(hold_days=0, max_conversions_per_click=0), campaign_id="cmp_1")
    assert (zeros.hold_days, zeros.max_conversions_per_click) == (0, 0)


def test_campaign_round_trip_never_carries_a_token() -> None:
    campaign = campaign_from_proto(
        _campaign(attribution_policy=pb.ATTRIBUTION_POLICY_CLICK_FIRST, status=pb.CAMPAIGN_STATUS_PAUSED),
        campaign_id="cmp_1",
    )
    message = campaign_to_proto(campaign)
    assert message.postback_token == ""
    assert message.attribution_policy == pb.ATTRIBUTION_POLICY_CLICK_FIRST
    assert message.status == pb.CAMPAIGN_STATUS_PAUSED
    assert campaign_from_proto(message, campaign_id="cmp_1") == campaign
    assert campaign_to_proto(campaign, postback_token="secret").postback_token == "secret"


# ---------------------------------------------------------------- coupons


def test_the_seed_coupon_passes_and_converts_exactly() -> None:
    message = _coupon(
        valid_from=_ts("2025-06-26T00:00:00+00:00"),
        valid_until=_ts("2025-09-25T00:00:00+00:00"),
        usage_limit=150,
        affiliate_ids=["aff_b", "aff_a"],
    )
    rules.validate_coupon(message)
    coupon = coupon_from_proto(message)
    assert coupon.code == "SUMMER25"
    assert coupon.kind == "general"
    assert coupon.status == "active"
    assert coupon.valid_from == datetime(2025, 6, 26, tzinfo=UTC)
    assert coupon.valid_until == datetime(2025, 9, 25, tzinfo=UTC)
    assert coupon.affiliate_ids == ("aff_b", "aff_a")
    out = coupon_to_proto(coupon)
    assert out.remaining == 150 and out.HasField("remaining")
    assert out.valid_until == message.valid_until


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("coupon.code", {"code": ""}),
        ("coupon.code", {"code": "ab"}),
        ("coupon.code", {"code": "A" * 65}),
        ("coupon.code", {"code": "SAVE 10"}),
        ("coupon.code", {"code": "SAVE10%"}),
        ("coupon.code", {"code": "ÄPFEL10"}),
        ("coupon.campaign_id", {"campaign_id": ""}),
        ("coupon.kind", {"kind": 42}),
        ("coupon.status", {"status": 42}),
        (
            "coupon.valid_until",
            {"valid_from": _ts("2025-09-25T00:00:00+00:00"), "valid_until": _ts("2025-06-26T00:00:00+00:00")},
        ),
        (
            "coupon.valid_until",
            {"valid_from": _ts("2025-06-26T00:00:00+00:00"), "valid_until": _ts("2025-06-26T00:00:00+00:00")},
        ),
        ("coupon.valid_from", {"valid_from": timestamp_pb2.Timestamp(seconds=-10**12)}),
        ("coupon.usage_limit", {"usage_limit": -1}),
        ("coupon.per_customer_limit", {"per_customer_limit": -1}),
        ("coupon.discount_percent_bp", {"discount_percent_bp": -1}),
        ("coupon.discount_percent_bp", {"discount_percent_bp": 10_001}),
        ("coupon.discount_micros", {"discount_micros": -5}),
        ("coupon.discount_micros", {"discount_micros": 5, "discount_percent_bp": 5}),
        ("coupon.min_order_micros", {"min_order_micros": -1}),
        ("coupon.affiliate_ids", {"kind": pb.COUPON_KIND_EXCLUSIVE}),
        (
            "coupon.allow_all_affiliates",
            {"kind": pb.COUPON_KIND_EXCLUSIVE, "affiliate_ids": ["aff_a"], "allow_all_affiliates": True},
        ),
        ("coupon.affiliate_ids", {"allow_all_affiliates": True, "affiliate_ids": ["aff_a"]}),
        ("coupon.affiliate_ids[1]", {"affiliate_ids": ["aff_a", "aff_a"]}),
        ("coupon.affiliate_ids[0]", {"affiliate_ids": ["bad id"]}),
        ("coupon.usage_limit", {"kind": pb.COUPON_KIND_UNIQUE, "usage_limit": 2}),
        ("coupon.affiliate_ids", {"kind": pb.COUPON_KIND_UNIQUE, "affiliate_ids": ["aff_a", "aff_b"]}),
        ("coupon.countries[0]", {"countries": ["USA"]}),
        ("coupon.countries[1]", {"countries": ["de", "ZZ"]}),
        ("coupon.device_types[0]", {"device_types": [pb.DEVICE_TYPE_UNSPECIFIED]}),
        ("coupon.device_types[0]", {"device_types": [17]}),
        ("coupon.channels[0]", {"channels": ["paid social"]}),
        ("coupon.skus[0]", {"skus": [" "]}),
        ("coupon.assigned_customer_id", {"assigned_customer_id": "c" * 257}),
        ("coupon.countries", {"countries": ["US"] * 1001}),
    ],
)
def test_bad_coupon_fields(field: str, fields: dict[str, Any]) -> None:
    violations = _violations(lambda: rules.validate_coupon(_coupon(**fields)))
    assert field in violations, violations


def test_every_violation_is_reported() -> None:
    violations = _violations(
        lambda: rules.validate_coupon(
            _coupon(code="x", usage_limit=-1, kind=pb.COUPON_KIND_EXCLUSIVE, countries=["XX"])
        )
    )
    assert set(violations) == {"coupon.code", "coupon.usage_limit", "coupon.affiliate_ids", "coupon.countries[0]"}


def test_codes_and_lists_are_normalized() -> None:
    message = _coupon(
        code="  Summer-25_b ",
        countries=["us", "US", "de"],
        channels=["Influencer", "influencer"],
        device_types=[pb.DEVICE_TYPE_TABLET, pb.DEVICE_TYPE_TABLET],
        skus=["sku-1"],
    )
    rules.validate_coupon(message)
    coupon = coupon_from_proto(message)
    assert coupon.code == "SUMMER-25_B"
    assert coupon.countries == ("US", "DE")
    assert coupon.channels == ("influencer",)
    assert coupon.device_types == ("tablet",)
    assert coupon.skus == ("sku-1",)


def test_unique_codes_default_to_one_use() -> None:
    message = _coupon(kind=pb.COUPON_KIND_UNIQUE, affiliate_ids=["aff_a"])
    rules.validate_coupon(message)
    coupon = coupon_from_proto(message)
    assert (coupon.kind, coupon.usage_limit) == ("unique", 1)
    rules.validate_coupon(_coupon(kind=pb.COUPON_KIND_UNIQUE, usage_limit=1))


def test_kosovo_and_a_sub_second_window_are_accepted() -> None:
    rules.validate_coupon(
        _coupon(
            countries=["XK"],
            valid_from=timestamp_pb2.Timestamp(seconds=100, nanos=1_000),
            valid_until=timestamp_pb2.Timestamp(seconds=100, nanos=2_000),
        )
    )
    # Nanoseconds that PostgreSQL would fold together are not a window.
    assert "coupon.valid_until" in _violations(
        lambda: rules.validate_coupon(
            _coupon(
                valid_from=timestamp_pb2.Timestamp(seconds=100, nanos=1),
                valid_until=timestamp_pb2.Timestamp(seconds=100, nanos=999),
            )
        )
    )


def test_coupon_round_trip() -> None:
    message = _coupon(
        kind=pb.COUPON_KIND_EXCLUSIVE,
        status=pb.COUPON_STATUS_HOLD,
        valid_from=_ts("2025-06-26T12:30:00.123456+00:00"),
        usage_limit=10,
        affiliate_ids=["aff_a"],
        per_customer_limit=2,
        discount_micros=3_000_000,
        countries=["FR"],
        device_types=[pb.DEVICE_TYPE_MOBILE, pb.DEVICE_TYPE_DESKTOP],
        channels=["email"],
        skus=["A", "B"],
        min_order_micros=1,
        assigned_customer_id="cust-1",
    )
    coupon = coupon_from_proto(message, used=4)
    out = coupon_to_proto(coupon)
    assert out.remaining == 6
    assert coupon_from_proto(out, used=4) == coupon
    message.code = "SUMMER25"
    out.ClearField("used")
    out.ClearField("remaining")
    assert out == message


def test_timestamps_keep_microseconds_in_utc() -> None:
    moment = datetime(2025, 9, 24, 23, 59, 59, 999_999, tzinfo=UTC)
    assert from_timestamp(to_timestamp(moment)) == moment
    assert to_timestamp(datetime(1970, 1, 1, tzinfo=UTC)).seconds == 0


# ---------------------------------------------------------------- requests


def test_field_masks() -> None:
    mutable = rules.COUPON_MUTABLE_FIELDS
    assert rules.mask_paths(field_mask_pb2.FieldMask(), mutable) == mutable
    assert rules.mask_paths(field_mask_pb2.FieldMask(paths=["status"]), mutable) == {"status"}
    violations = _violations(
        lambda: rules.mask_paths(field_mask_pb2.FieldMask(paths=["status", "used", "code", "nope"]), mutable)
    )
    assert set(violations) == {"update_mask.paths[1]", "update_mask.paths[2]", "update_mask.paths[3]"}
    assert "postback_token" not in rules.CAMPAIGN_MUTABLE_FIELDS
    assert "id" not in rules.AFFILIATE_MUTABLE_FIELDS


def test_usage_limit_against_used() -> None:
    rules.check_usage_limit(10, 10)
    rules.check_usage_limit(0, 500)  # unlimited
    with pytest.raises(FailedPrecondition):
        rules.check_usage_limit(9, 10)


def test_page_size_and_tokens() -> None:
    assert rules.page_size(0) == 100
    assert rules.page_size(5000) == 1000
    assert rules.page_size(7) == 7
    assert "page_size" in _violations(lambda: rules.page_size(-1))
    token = encode_page_token("coupons/cmp_1", "SUMMER25")
    assert decode_page_token(token, "coupons/cmp_1") == "SUMMER25"
    assert decode_page_token("", "coupons/cmp_1") == ""
    for bad in (token, "%%%", "bm90IGEgdG9rZW4"):
        with pytest.raises(InvalidArgument):
            decode_page_token(bad, "coupons/cmp_2")


def test_lookups_normalize_codes() -> None:
    assert rules.validate_code_lookup("code", " summer25 ") == "SUMMER25"
    assert "code" in _violations(lambda: rules.validate_code_lookup("code", "no"))


def test_a_code_is_assigned_to_a_customer_or_an_affiliate() -> None:
    def request(**fields: str) -> pb.AssignCodeRequest:
        return pb.AssignCodeRequest(campaign_id="cmp_1", batch_id="bat_1", **fields)

    rules.validate_assign_code(request(customer_id="cust-1"))
    rules.validate_assign_code(request(affiliate_id="aff_1"))
    assert set(_violations(lambda: rules.validate_assign_code(request()))) == {"customer_id"}
    both = _violations(lambda: rules.validate_assign_code(request(customer_id="c", affiliate_id="aff_1")))
    assert set(both) == {"customer_id"}
    for bad in ("aff 1", "a" * 65, "aff/1"):
        message = request(affiliate_id=bad)
        assert set(_violations(lambda m=message: rules.validate_assign_code(m))) == {"affiliate_id"}


def test_an_affiliates_code_keeps_it_as_its_only_affiliate() -> None:
    held = Coupon(campaign_id="cmp_1", code="INF1", assigned_affiliate_id="ann", affiliate_ids=("ann",))
    rules.check_affiliate_holder(held, replace(held, status="paused", kind="general"))
    free = Coupon(campaign_id="cmp_1", code="X1")
    rules.check_affiliate_holder(free, replace(free, allow_all_affiliates=True))
    for changed in (
        replace(held, affiliate_ids=("bob",)),
        replace(held, affiliate_ids=("ann", "bob")),
        replace(held, affiliate_ids=(), allow_all_affiliates=True),
        replace(held, assigned_customer_id="cust-1"),
    ):
        with pytest.raises(FailedPrecondition):
            rules.check_affiliate_holder(held, changed)


# ---------------------------------------------------------------- generated codes


def _generate(**fields: Any) -> pb.GenerateCodesRequest:
    values: dict[str, Any] = {"template": pb.Coupon(campaign_id="cmp_1"), "count": 1000}
    values.update(fields)
    return pb.GenerateCodesRequest(**values)


def test_a_good_generate_request_passes() -> None:
    rules.validate_generate_codes(_generate())
    rules.validate_generate_codes(_generate(count=1_000_000, prefix="vip-"))
    rules.validate_generate_codes(
        _generate(template=pb.Coupon(campaign_id="cmp_1", kind=pb.COUPON_KIND_UNIQUE, usage_limit=1))
    )


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("count", {"count": 0}),
        ("count", {"count": -5}),
        ("count", {"count": 1_000_001}),
        ("prefix", {"prefix": "vip!"}),
        ("length", {"length": 3}),
        ("length", {"length": 5, "count": 1_000_000}),
        ("length", {"length": 60, "prefix": "P" * 10}),
        ("template", {"template": None}),
        ("template.code", {"template": pb.Coupon(campaign_id="cmp_1", code="FIXED")}),
        ("template.kind", {"template": pb.Coupon(campaign_id="cmp_1", kind=pb.COUPON_KIND_EXCLUSIVE)}),
        ("template.usage_limit", {"template": pb.Coupon(campaign_id="cmp_1", usage_limit=3)}),
        ("template.campaign_id", {"template": pb.Coupon()}),
        ("template.countries[0]", {"template": pb.Coupon(campaign_id="cmp_1", countries=["XX"])}),
        ("template.assigned_customer_id", {"template": pb.Coupon(campaign_id="cmp_1", assigned_customer_id="c1")}),
        # 54 characters of prefix, 10 random symbols and the check symbol: 65 > 64.
        ("length", {"length": 10, "prefix": "P" * 54}),
    ],
)
def test_bad_generate_requests(field: str, fields: dict[str, Any]) -> None:
    violations = _violations(lambda: rules.validate_generate_codes(_generate(**fields)))
    assert field in violations, violations


def test_generated_codes_have_the_batch_shape() -> None:
    shape = rules.generated_shape(_generate(prefix="vip-", length=10))
    assert shape == code_check.CodeShape("VIP-", 10)
    codes = code_check.split_block(code_check.random_code_block(5000, shape.prefix, shape.length), 15)
    assert len(codes) == 5000
    assert len(set(codes)) == 5000  # 50 random bits each: a repeat here would be a bug
    for code in codes:
        assert code.startswith("VIP-") and len(code) == 15  # prefix, 10 random symbols, 1 check symbol
        assert set(code[4:]) <= set(rules.CODE_ALPHABET)
        assert shape.has_shape(code) and not shape.is_mistyped(code)
    assert rules.generated_shape(_generate()).length == rules.DEFAULT_GENERATED_LENGTH


def test_minimum_length_grows_with_the_batch() -> None:
    assert rules.minimum_length(1) == rules.MIN_GENERATED_LENGTH
    assert rules.minimum_length(1_000_000) == 6
    assert rules.generated_length(0) == rules.DEFAULT_GENERATED_LENGTH


def test_a_customer_id_with_a_control_character_is_refused_before_postgresql_sees_it() -> None:
    with pytest.raises(InvalidArgument) as refused:
        rules.validate_assign_code(pb.AssignCodeRequest(campaign_id="c", batch_id="b", customer_id="a\x00b"))
    assert refused.value.field == "customer_id"
    rules.validate_assign_code(pb.AssignCodeRequest(campaign_id="c", batch_id="b", customer_id="ü-42"))
