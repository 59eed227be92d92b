"""A Conversion proto rendered as the postback's JSON (ARCHITECTURE.md section 5)."""

from __future__ import annotations

import json

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.render import STATUS_WORDS, money, render_conversion


def ts(text: str) -> Timestamp:
    value = Timestamp()
    value.FromJsonString(text)
    return value


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (49_900_000, "49.90"),
        (5_000_000, "5.00"),
        (0, "0.00"),
        (1, "0.000001"),
        (49_950_000, "49.95"),
        (49_955_000, "49.955"),
        (123_456_789_012_999_999, "123456789012.999999"),
        (-2_500_000, "-2.50"),
    ],
)
def test_money(micros: int, text: str) -> None:
    assert money(micros) == text


def test_pending_coupon_conversion() -> None:
    conversion = pb.Conversion(
        id="cv1",
        campaign_id="c1",
        order_id="o1",
        status=pb.CONVERSION_STATUS_PENDING,
        affiliate_id="a1",
        source=pb.ATTRIBUTION_SOURCE_COUPON,
        coupon_code="SUMMER10",
        amount_micros=49_900_000,
        discount_micros=5_000_000,
        currency="EUR",
        payout_micros=5_000_000,
        hold_until=ts("2025-10-26T12:00:00Z"),
        coupon_remaining=149,
        fraud_score=3,
        received_at=ts("2025-09-26T12:00:00.250Z"),
        occurred_at=ts("2025-09-26T11:59:00Z"),
        customer_id="cu1",
    )
    body = render_conversion(conversion)
    assert body == {
        "id": "cv1",
        "campaign_id": "c1",
        "order_id": "o1",
        "status": "pending",
        "reasons": [],
        "affiliate_id": "a1",
        "source": "coupon",
        "click_id": "",
        "coupon_code": "SUMMER10",
        "customer_id": "cu1",
        "amount": "49.90",
        "discount": "5.00",
        "refunded": "0.00",
        "currency": "EUR",
        "payout": "5.00",
        "fraud_score": 3,
        "coupon_remaining": 149,
        "hold_until": "2025-10-26T12:00:00Z",
        "received_at": "2025-09-26T12:00:00.250Z",
        "occurred_at": "2025-09-26T11:59:00Z",
    }
    # Plain JSON types only, and counts stay numbers.
    assert json.loads(json.dumps(body))["coupon_remaining"] == 149


def test_rejected_conversion_without_limits_or_hold() -> None:
    conversion = pb.Conversion(
        order_id="o2",
        status=pb.CONVERSION_STATUS_REJECTED,
        reasons=["usage_limit_reached", "fraud_tor_exit"],
        source=pb.ATTRIBUTION_SOURCE_NONE,
        amount_micros=10_000_000,
    )
    body = render_conversion(conversion)
    assert body["status"] == "rejected"
    assert body["source"] == "none"
    assert body["reasons"] == ["usage_limit_reached", "fraud_tor_exit"]
    assert "coupon_remaining" not in body
    assert "hold_until" not in body
    assert "history" not in body


def test_zero_remaining_is_shown_not_dropped() -> None:
    body = render_conversion(pb.Conversion(coupon_remaining=0))
    assert body["coupon_remaining"] == 0


def test_every_status_and_source_word() -> None:
    words = {
        render_conversion(pb.Conversion(status=number))["status"] for _, number in pb.ConversionStatus.items()
    }
    assert len(words) == len(STATUS_WORDS.words) + 1  # and "unspecified"
    assert words == {"unspecified", "pending", "approved", "rejected", "reversed", "flagged"}
    assert render_conversion(pb.Conversion(source=pb.ATTRIBUTION_SOURCE_CLICK))["source"] == "click"


def test_refund_and_history() -> None:
    conversion = pb.Conversion(
        status=pb.CONVERSION_STATUS_PENDING,
        amount_micros=49_900_000,
        refunded_micros=10_000_000,
        history=[
            pb.ConversionEvent(
                to_status=pb.CONVERSION_STATUS_PENDING,
                at=ts("2025-09-26T12:00:00Z"),
                reason="judged",
                actor="system",
            ),
            pb.ConversionEvent(
                from_status=pb.CONVERSION_STATUS_PENDING,
                to_status=pb.CONVERSION_STATUS_PENDING,
                at=ts("2025-09-27T12:00:00Z"),
                reason="refund",
                actor="shop",
                note="r1",
                amount_micros=10_000_000,
            ),
        ],
    )
    body = render_conversion(conversion)
    assert body["refunded"] == "10.00"
    assert body["history"] == [
        {
            "from_status": "unspecified",
            "to_status": "pending",
            "at": "2025-09-26T12:00:00Z",
            "reason": "judged",
            "actor": "system",
            "note": "",
        },
        {
            "from_status": "pending",
            "to_status": "pending",
            "at": "2025-09-27T12:00:00Z",
            "reason": "refund",
            "actor": "shop",
            "note": "r1",
            "amount": "10.00",
        },
    ]


def test_unknown_enum_number_does_not_crash() -> None:
    conversion = pb.Conversion()
    conversion.status = 99  # type: ignore[assignment]
    assert render_conversion(conversion)["status"] == "99"
