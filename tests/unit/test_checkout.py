"""Checkout validation's pure parts: the dry-run judgment, the guard's table, the peer address."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from ascribe.fraud.v1 import fraud_pb2

from services.attribution.checkout.guard import GuessGuard
from services.attribution.checkout.rules import CheckoutInput, judge_checkout
from services.attribution.checkout.validator import peer_ip
from services.attribution.common.models import Affiliate, Campaign, Coupon

NOW = datetime(2026, 7, 1, 12, tzinfo=UTC)
CAMPAIGN = Campaign(id="cmp", name="c", landing_url="https://shop.example", currency="EUR")


def item(**fields: Any) -> CheckoutInput:
    values: dict[str, Any] = {"campaign_id": "cmp", "code": "SUMMER10", "at": NOW, "amount_micros": 50_000_000,
                              "currency": "EUR"}
    values.update(fields)
    return CheckoutInput(**values)


def judge(coupon: Coupon | None, uses: int = 0, affiliates: dict[str, Affiliate | None] | None = None,
          **fields: Any) -> tuple[bool, list[str]]:
    judgment = judge_checkout(item(**fields), CAMPAIGN, None, coupon, affiliates or {},
                              missing_coupon_reason="unknown_coupon", customer_uses=uses)
    return judgment.valid, list(judgment.reasons)


def test_limits_are_read_not_taken() -> None:
    assert judge(Coupon("cmp", "SUMMER10", usage_limit=3, used=2)) == (True, [])
    assert judge(Coupon("cmp", "SUMMER10", usage_limit=3, used=3)) == (False, ["usage_limit_reached"])
    limited = Coupon("cmp", "SUMMER10", per_customer_limit=2)
    assert judge(limited, uses=1, customer_id="c") == (True, [])
    assert judge(limited, uses=2, customer_id="c") == (False, ["customer_limit_reached"])
    assert judge(limited) == (False, ["customer_id_required"])


def test_the_subtotal_before_the_discount_meets_the_minimum_and_a_hold_is_valid() -> None:
    assert judge(Coupon("cmp", "SUMMER10", min_order_micros=50_000_000)) == (True, [])
    assert judge(Coupon("cmp", "SUMMER10", min_order_micros=50_000_001)) == (False, ["below_min_order"])
    assert judge(Coupon("cmp", "SUMMER10", status="hold")) == (True, ["coupon_on_hold"])
    assert judge(Coupon("cmp", "SUMMER10", valid_until=NOW)) == (False, ["coupon_expired"])
    assert judge(None) == (False, ["unknown_coupon"])


def test_an_affiliate_without_a_click_is_held_to_the_code_s_access() -> None:
    selected = Coupon("cmp", "SUMMER10", affiliate_ids=("ann", "bob"))
    ann: dict[str, Affiliate | None] = {"ann": Affiliate(id="ann", name="Ann", channel="social")}
    assert judge(selected, affiliates=ann, affiliate_id="ann") == (True, [])
    assert judge(selected, affiliates=ann, affiliate_id="eve") == (False, ["affiliate_not_allowed"])
    assert judge(Coupon("cmp", "SUMMER10", allow_all_affiliates=True), affiliate_id="eve") == (True, [])


@pytest.mark.parametrize(("peer", "ip"), [
    ("ipv4:203.0.113.9:5123", "203.0.113.9"),
    ("ipv6:[2001:db8::1]:5123", "2001:db8::1"),
    ("ipv6:[::ffff:198.51.100.1]:80", "198.51.100.1"),
    # what gRPC core 1.85 actually answers for an IPv6 peer: the brackets percent-encoded
    ("ipv6:%5B2001:db8::1%5D:5123", "2001:db8::1"),
    ("unix:/tmp/socket", ""),
    (None, ""),
])
def test_the_peer_address(peer: str | None, ip: str) -> None:
    assert peer_ip(peer) == ip


class FakeFraud:
    """Answers CheckCodeGuessing from a scripted state (the guard's table is pure logic)."""

    def __init__(self) -> None:
        self.state: fraud_pb2.GuessingState | None = fraud_pb2.GuessingState()
        self.asked: list[fraud_pb2.CodeAttempt] = []

    async def check_code_attempt(self, attempt: fraud_pb2.CodeAttempt) -> fraud_pb2.GuessingState | None:
        self.asked.append(attempt)
        return self.state


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_guard_blocks_what_the_fraud_service_names_until_its_window_ends() -> None:
    fraud, clock = FakeFraud(), Clock()
    guard = GuessGuard(fraud, clock=clock)  # type: ignore[arg-type]
    await guard.missed("cmp", "NOPE", "2001:db8:1:2::5", "cust")
    assert guard.retry_after("cmp", "2001:db8:1:2::5", "cust") is None  # under the threshold
    fraud.state = fraud_pb2.GuessingState(blocked=True, retry_after_seconds=600, address_blocked=True)
    await guard.missed("cmp", "NOPE", "2001:db8:1:2::5", "cust")
    assert guard.retry_after("cmp", "2001:db8:1:2::77", "") == 600  # the same /64
    assert guard.retry_after("cmp", "2001:db8:1:3::5", "cust") is None  # another /64, the customer is fine
    clock.now += 599.5
    assert guard.retry_after("cmp", "2001:db8:1:2::5", "") == 1
    clock.now += 1
    assert guard.retry_after("cmp", "2001:db8:1:2::5", "") is None

    fraud.state = fraud_pb2.GuessingState(blocked=True, retry_after_seconds=60, customer_blocked=True)
    await guard.missed("cmp", "NOPE", "198.51.100.1", "cust")
    assert guard.retry_after("cmp", "203.0.113.1", "cust") == 60
    assert guard.retry_after("other", "203.0.113.1", "cust") is None  # customer ids are per campaign
    assert guard.retry_after("cmp", "198.51.100.1", "") is None


async def test_the_guard_fails_open_and_stays_bounded() -> None:
    fraud, clock = FakeFraud(), Clock()
    fraud.state = None  # the fraud service down or late
    guard = GuessGuard(fraud, clock=clock, max_entries=10)  # type: ignore[arg-type]
    await guard.missed("cmp", "NOPE", "203.0.113.1", "")
    assert guard.retry_after("cmp", "203.0.113.1", "") is None
    await guard.missed("cmp", "NOPE", "", "")  # nothing to count against: no call
    assert len(fraud.asked) == 1
    fraud.state = fraud_pb2.GuessingState(blocked=True, retry_after_seconds=600, address_blocked=True)
    for i in range(25):
        await guard.missed("cmp", "NOPE", f"203.0.113.{i + 1}", "")
    assert len(guard._blocked) <= 10
    assert guard.retry_after("cmp", "203.0.113.25", "") == 600  # the newest are kept
