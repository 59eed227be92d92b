"""The coupon rules and the credit table, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.attribution.common.coupon_rules import (
    Order,
    click_tracking_reasons,
    credit,
    normalize_code,
    payout_micros,
    static_reasons,
    validity_reasons,
)
from services.attribution.common.models import Coupon

START = datetime(2025, 6, 26, tzinfo=UTC)
END = datetime(2025, 9, 25, tzinfo=UTC)  # "to 2025-09-24 (UTC)": the last day counts whole


def coupon(**fields: object) -> Coupon:
    values: dict[str, object] = {"campaign_id": "cmp", "code": "SUMMER10"}
    values.update(fields)
    return Coupon(**values)  # type: ignore[arg-type]


def order(**fields: object) -> Order:
    values: dict[str, object] = {
        "occurred_at": START + timedelta(days=1), "amount_micros": 50_000_000, "discount_micros": 0,
        "currency": "EUR", "customer_id": "", "country": "", "device_type": None, "skus": (),
    }
    values.update(fields)
    return Order(**values)  # type: ignore[arg-type]


def test_codes_are_case_insensitive() -> None:
    assert normalize_code(" summer10 ") == "SUMMER10"


@pytest.mark.parametrize(
    ("at", "reasons"),
    [
        (START - timedelta(microseconds=1), ["coupon_not_yet_valid"]),
        (START, []),
        (datetime(2025, 9, 24, 23, 59, 59, tzinfo=UTC), []),
        (END, ["coupon_expired"]),
    ],
)
def test_validity_window_is_half_open(at: datetime, reasons: list[str]) -> None:
    assert validity_reasons(coupon(valid_from=START, valid_until=END), at) == reasons


def test_click_tracking_needs_an_allowed_affiliate_and_a_live_code() -> None:
    selected = coupon(affiliate_ids=("A",))
    assert click_tracking_reasons(selected, "A", START) == []
    assert click_tracking_reasons(selected, "B", START) == ["affiliate_not_allowed"]
    assert click_tracking_reasons(coupon(allow_all_affiliates=True), "B", START) == []
    assert click_tracking_reasons(None, "A", START) == ["unknown_coupon"]
    assert click_tracking_reasons(coupon(status="paused"), "A", START) == ["coupon_inactive"]
    assert click_tracking_reasons(coupon(usage_limit=1, used=1), "A", START) == ["usage_limit_reached"]


GENERAL_ALL = coupon(allow_all_affiliates=True)
GENERAL_SELECTED = coupon(affiliate_ids=("A",))
GENERAL_TWO_SELECTED = coupon(affiliate_ids=("A", "B"))
EXCLUSIVE_B = coupon(kind="exclusive", affiliate_ids=("B",))
UNIQUE_B = coupon(kind="unique", affiliate_ids=("B",), usage_limit=1)
UNIQUE_NO_OWNER = coupon(kind="unique", usage_limit=1)


@pytest.mark.parametrize("policy", ["coupon_first", "click_first"])
@pytest.mark.parametrize(
    ("code", "clicker", "expected"),
    [
        (None, "A", ("A", "click", ())),
        (None, None, (None, "none", ())),
        (GENERAL_ALL, "A", ("A", "click", ())),
        (GENERAL_SELECTED, "A", ("A", "click", ())),
        (GENERAL_SELECTED, "B", ("B", "click", ("affiliate_not_allowed",))),
        (GENERAL_ALL, None, (None, "none", ())),
        (GENERAL_SELECTED, None, ("A", "coupon", ())),
        (GENERAL_TWO_SELECTED, None, (None, "none", ())),
        (GENERAL_TWO_SELECTED, "B", ("B", "click", ())),
        (EXCLUSIVE_B, "B", ("B", "click", ())),
        (EXCLUSIVE_B, None, ("B", "coupon", ())),
        (UNIQUE_B, "B", ("B", "click", ())),
        (UNIQUE_B, None, ("B", "coupon", ())),
        (UNIQUE_NO_OWNER, "A", ("A", "click", ())),
    ],
)
def test_credit_table_rows_that_do_not_depend_on_policy(
    policy: str, code: Coupon | None, clicker: str | None, expected: tuple[object, ...]
) -> None:
    result = credit(policy, code, clicker)  # type: ignore[arg-type]
    assert (result.affiliate_id, result.source, result.reasons) == expected


@pytest.mark.parametrize("code", [EXCLUSIVE_B, UNIQUE_B])
def test_a_click_and_a_code_that_disagree_follow_the_policy(code: Coupon) -> None:
    assert credit("coupon_first", code, "A").affiliate_id == "B"
    assert credit("coupon_first", code, "A").source == "coupon"
    assert credit("click_first", code, "A").affiliate_id == "A"
    assert credit("click_first", code, "A").source == "click"


def test_several_owners_credit_the_named_click_else_the_primary() -> None:
    shared = coupon(kind="exclusive", affiliate_ids=("B", "C"))
    assert credit("coupon_first", shared, "C").affiliate_id == "C"
    assert credit("coupon_first", shared, None).affiliate_id == "B"


def test_static_rules_list_every_failure() -> None:
    strict = coupon(
        countries=("DE",), device_types=("mobile",), channels=("social",), skus=("SKU-1",),
        min_order_micros=100_000_000, per_customer_limit=1, assigned_customer_id="alice",
    )
    reasons = static_reasons(
        strict, order(country="fr", device_type="desktop", skus=("X",), currency="USD"),
        campaign_currency="EUR", credited_channel=None,
    )
    assert reasons == [
        "customer_not_assigned", "restriction_country", "restriction_device", "restriction_channel",
        "restriction_sku", "below_min_order", "currency_mismatch", "customer_id_required",
    ]
    fine = order(country="de", device_type="mobile", skus=("sku-1",), amount_micros=90_000_000,
                 discount_micros=10_000_000, customer_id="alice")
    assert static_reasons(strict, fine, campaign_currency="EUR", credited_channel="social") == []


def test_hold_status_flags_and_others_reject() -> None:
    assert static_reasons(coupon(status="hold"), order(), campaign_currency="EUR", credited_channel=None) == [
        "coupon_on_hold"
    ]


def test_payout_is_fixed_or_a_percentage_of_the_amount() -> None:
    assert payout_micros(49_900_000, 5_000_000, 0) == 5_000_000
    assert payout_micros(49_900_000, 0, 1000) == 4_990_000
