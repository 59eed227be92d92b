"""The judgment steps of a conversion, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.attribution.common.models import Affiliate, Campaign, Click, Coupon
from services.attribution.conversions.rules import (
    ConversionInput,
    final_status,
    hold_until,
    is_fixable,
    judge_static,
)

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
CAMPAIGN = Campaign(id="cmp", name="c", landing_url="https://x", currency="EUR")
AFFILIATES = {"A": Affiliate(id="A", name="A", channel="social"), "P": Affiliate(id="P", name="P", status="paused")}


def conversion(**fields: object) -> ConversionInput:
    values: dict[str, object] = {
        "campaign_id": "cmp", "order_id": "o1", "amount_micros": 10_000_000, "discount_micros": 0,
        "currency": "EUR", "received_at": NOW, "occurred_at": NOW, "occurred_at_sent": False,
    }
    values.update(fields)
    return ConversionInput(**values)  # type: ignore[arg-type]


def click(**fields: object) -> Click:
    values: dict[str, object] = {
        "click_id": "k1", "created_at": NOW - timedelta(hours=1), "campaign_id": "cmp", "affiliate_id": "A",
        "occurred_at": NOW - timedelta(hours=1), "decision": "accepted", "conversions": 0,
    }
    values.update(fields)
    return Click(**values)  # type: ignore[arg-type]


def test_fingerprint_ignores_a_default_time_but_not_a_sent_one() -> None:
    assert conversion().fingerprint == conversion(occurred_at=NOW - timedelta(seconds=5)).fingerprint
    assert conversion(occurred_at_sent=True).fingerprint != conversion().fingerprint
    assert conversion(skus=("a", "b")).fingerprint == conversion(skus=("b", "a")).fingerprint
    assert conversion(amount_micros=1).fingerprint != conversion().fingerprint


def test_ineligible_clicks_are_recorded_and_the_sale_goes_on_without_them() -> None:
    cases = {
        "unknown_click": None,
        "click_outside_lookback": click(occurred_at=NOW - timedelta(days=31)),
        "click_rejected": click(decision="rejected"),
        "click_already_converted": click(conversions=1),
    }
    for reason, info in cases.items():
        judged = judge_static(conversion(click_id="k1"), CAMPAIGN, info, None, AFFILIATES)
        assert judged.reasons == [reason]
        assert (judged.affiliate_id, judged.source, judged.rejected) == (None, "none", False)


def test_campaign_state_and_age_reject() -> None:
    paused = Campaign(id="cmp", name="c", landing_url="https://x", currency="EUR", status="paused")
    assert "campaign_inactive" in judge_static(conversion(), paused, None, None, AFFILIATES).reasons
    old = conversion(occurred_at=NOW - timedelta(days=31))
    assert "postback_too_late" in judge_static(old, CAMPAIGN, None, None, AFFILIATES).reasons


def test_credited_affiliate_must_exist_and_be_active() -> None:
    owned = Coupon(campaign_id="cmp", code="X", kind="exclusive", affiliate_ids=("P",))
    judged = judge_static(conversion(coupon_code="X"), CAMPAIGN, None, owned, AFFILIATES)
    assert judged.reasons == ["affiliate_inactive"] and judged.rejected
    gone = Coupon(campaign_id="cmp", code="X", kind="exclusive", affiliate_ids=("Z",))
    assert judge_static(conversion(coupon_code="X"), CAMPAIGN, None, gone, AFFILIATES).reasons == [
        "unknown_affiliate"
    ]


def test_unknown_code_rejects_and_credit_ignores_it() -> None:
    judged = judge_static(conversion(coupon_code="NOPE", click_id="k1"), CAMPAIGN, click(), None, AFFILIATES)
    assert judged.reasons == ["unknown_coupon"] and judged.affiliate_id == "A" and judged.rejected


def test_final_status() -> None:
    assert final_status([], 30) == "pending"
    assert final_status([], 0) == "approved"
    assert final_status(["unknown_click"], 30) == "pending"
    assert final_status(["coupon_on_hold"], 30) == "flagged"
    assert final_status(["fraud_vpn_ip"], 30) == "flagged"
    assert final_status(["fraud_tor_exit"], 30, fraud_rejected=True) == "rejected"
    assert final_status(["coupon_expired", "coupon_on_hold"], 30) == "rejected"


def test_fixable_rejections() -> None:
    assert is_fixable(["customer_id_required", "unknown_click"])
    assert not is_fixable(["usage_limit_reached"])
    assert not is_fixable(["customer_id_required", "fraud_tor_exit"])
    assert not is_fixable(["unknown_click"])  # not rejected at all


def test_backdating_cannot_shorten_the_hold() -> None:
    backdated = conversion(occurred_at=NOW - timedelta(days=5))
    assert hold_until(backdated, 30) == NOW + timedelta(days=30)
