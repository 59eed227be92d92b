"""What a re-score does to a conversion flagged because fraud was unavailable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ascribe.fraud.v1 import fraud_pb2

from services.attribution.lifecycle.rules import rescore_outcome

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ALLOW, REVIEW, REJECT = (
    fraud_pb2.VERDICT_ACTION_ALLOW, fraud_pb2.VERDICT_ACTION_REVIEW, fraud_pb2.VERDICT_ACTION_REJECT,
)


def test_an_allowed_conversion_goes_on_as_if_the_verdict_had_come_in_time() -> None:
    later = rescore_outcome(["fraud_unavailable", "unknown_click"], NOW + timedelta(days=1), ALLOW, [], NOW)
    assert (later.status, later.reasons, later.releases) == ("pending", ("unknown_click",), False)
    due = rescore_outcome(["fraud_unavailable"], NOW - timedelta(seconds=1), ALLOW, [], NOW)
    assert due.status == "approved"
    assert rescore_outcome(["fraud_unavailable"], None, ALLOW, [], NOW).status == "pending"


def test_review_keeps_it_flagged_with_the_signals_and_reject_gives_the_uses_back() -> None:
    review = rescore_outcome(["fraud_unavailable"], None, REVIEW, ["fraud_vpn_ip"], NOW)
    assert (review.status, review.reasons, review.releases) == ("flagged", ("fraud_vpn_ip",), False)
    reject = rescore_outcome(["fraud_unavailable"], None, REJECT, ["fraud_tor_exit"], NOW)
    assert (reject.status, reject.reasons, reject.releases) == ("rejected", ("fraud_tor_exit",), True)


def test_a_code_on_hold_still_needs_a_person_whatever_the_verdict_allows() -> None:
    held = rescore_outcome(["coupon_on_hold", "fraud_unavailable"], None, ALLOW, [], NOW)
    assert (held.status, held.reasons) == ("flagged", ("coupon_on_hold",))
