"""Reason words and enum copies, tied to the contract."""

from __future__ import annotations

from pathlib import Path

from ascribe.fraud.v1 import fraud_pb2

from services.attribution.common import reasons
from services.fraud import domain
from services.fraud.store import AlertKind

# ARCHITECTURE.md section 4, Conversion.reasons, as the contract lists them.
CONTRACT_REASONS = {
    "unknown_coupon", "coupon_inactive", "coupon_not_yet_valid", "coupon_expired", "usage_limit_reached",
    "customer_limit_reached", "customer_id_required", "customer_not_assigned", "coupon_on_hold",
    "click_already_converted", "affiliate_not_allowed", "unknown_affiliate", "affiliate_inactive",
    "campaign_inactive", "restriction_country", "restriction_device", "restriction_channel", "restriction_sku",
    "below_min_order", "currency_mismatch", "unknown_click", "click_rejected", "click_outside_lookback",
    "postback_too_late",
    # Added by issue 15 (codes at scale).
    "coupon_mistyped",
    # Added by issue 17 (holdout experiments): a click in the control arm.
    "experiment_holdout",
}
CONTRACT_FRAUD_REASONS = {
    "fraud_duplicate_click_id", "fraud_tor_exit", "fraud_datacenter_ip", "fraud_vpn_ip", "fraud_bot_user_agent",
    "fraud_click_velocity", "fraud_ctit_too_short", "fraud_code_sharing", "fraud_late_report", "fraud_unavailable",
}


def test_every_contract_reason_has_its_constant_and_nothing_else_does() -> None:
    assert reasons.ALL - {reasons.FRAUD_UNAVAILABLE} == CONTRACT_REASONS


def test_every_contract_fraud_reason_is_a_signal_code_or_ours() -> None:
    signal_codes = {value for name, value in vars(domain.Code).items() if name.isupper()}
    produced = {reasons.fraud_reason(code) for code in signal_codes} | {reasons.FRAUD_UNAVAILABLE}
    assert produced >= CONTRACT_FRAUD_REASONS


def test_reason_classes_do_not_overlap() -> None:
    assert not reasons.CLICK_REASONS & reasons.FLAGGING_REASONS
    assert not reasons.FIXABLE_REASONS & (reasons.CLICK_REASONS | reasons.FLAGGING_REASONS)
    assert all(reasons.rejects(r) for r in reasons.FIXABLE_REASONS)
    assert not reasons.rejects(reasons.UNKNOWN_CLICK) and not reasons.rejects(reasons.COUPON_ON_HOLD)
    assert reasons.rejects("fraud_tor_exit") and not reasons.rejects_statically("fraud_tor_exit")


def test_the_fraud_services_enums_are_the_generated_ones() -> None:
    for action in domain.Action:
        assert fraud_pb2.VerdictAction.Value(f"VERDICT_ACTION_{action.name}") == action.value
    for kind in domain.CouponKind:
        name = "UNSPECIFIED" if kind is domain.CouponKind.NONE else kind.name
        assert fraud_pb2.CouponKind.Value(f"COUPON_KIND_{name}") == kind.value
    assert len(domain.Action) == len(fraud_pb2.VerdictAction.values()) - 1  # UNSPECIFIED is no action
    kinds = {name: value for name, value in vars(AlertKind).items() if name.isupper()}
    assert kinds == {name.removeprefix("ALERT_KIND_"): value
                     for name, value in fraud_pb2.AlertKind.items() if value}
    assert len(domain.CouponKind) == len(fraud_pb2.CouponKind.values())


def test_the_report_migration_names_the_unknown_code_reasons_by_their_words() -> None:
    """Migration 014 counts orders with these reasons under coupon "": the words must be the module's."""
    sql = (Path(__file__).parents[2] / "services/attribution/migrations/014_report_keys.sql").read_text()
    expected = f"ARRAY['{reasons.UNKNOWN_COUPON}', '{reasons.COUPON_MISTYPED}']"
    assert sql.count(expected) == 2
