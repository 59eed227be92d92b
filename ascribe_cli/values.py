"""What people type, as the API's values: money, percentages, times and enum words.

Money is a decimal string turned into integer micros with ``Decimal`` (never a
float: ``0.1 + 0.2`` is not ``0.3``); percentages become basis points the same
way. Times are RFC 3339 with an offset, or a date: a date that starts a range
is that day's 00:00 UTC, a date that ends one is the next day's 00:00 UTC, so
the last day counts whole (ARCHITECTURE.md, validity). Enum words are the
lowercase name after the enum's prefix, as everywhere else in ascribe
(``COUPON_STATUS_HOLD`` is ``hold``).

Each parser raises ``ValueError`` with a message meant for the person who
typed the value; the commands turn it into a usage error (exit code 2).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor

if TYPE_CHECKING:
    from google._upb import _message as upb

MICROS = 1_000_000
INT64_MAX = 2**63 - 1

_MONEY = re.compile(r"\d+(\.\d{1,6})?")
_PERCENT = re.compile(r"\d+(\.\d{1,2})?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def money_micros(text: str) -> int:
    """``"49.90"`` -> ``49_900_000``: a non-negative decimal with at most 6 decimals, exactly."""
    value = text.strip()
    if not _MONEY.fullmatch(value):
        raise ValueError(f"{text!r} is not an amount like 49.90 (digits, at most 6 decimals)")
    micros = int(Decimal(value) * MICROS)
    if micros > INT64_MAX:
        raise ValueError(f"{text!r} is too large")
    return micros


def percent_basis_points(text: str) -> int:
    """``"12.5"`` -> ``1250`` basis points (at most 2 decimals, at most 100 %)."""
    value = text.strip().removesuffix("%")
    if not _PERCENT.fullmatch(value):
        raise ValueError(f"{text!r} is not a percentage like 12.5 (at most 2 decimals)")
    basis_points = int(Decimal(value) * 100)
    if basis_points > 10_000:
        raise ValueError(f"{text!r} is more than 100 %")
    return basis_points


def instant(text: str, *, end: bool = False) -> timestamp_pb2.Timestamp:
    """RFC 3339 with an offset, or ``YYYY-MM-DD`` (UTC): a range's start, or with ``end`` its exclusive end."""
    value = text.strip()
    if _DATE.fullmatch(value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{text!r} is not a date") from None
        at = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if end:
            # The last day counts whole: "until 2026-12-31" ends at 2027-01-01T00:00Z.
            at += timedelta(days=1)
    elif _RFC3339.fullmatch(value):
        try:
            at = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not a valid time") from None
    else:
        raise ValueError(f"{text!r} is neither YYYY-MM-DD nor RFC 3339 (2026-06-01T09:30:00Z)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at.astimezone(UTC))
    return stamp


# ---------------------------------------------------------------- enum words
# Typer shows these as the choices of an option. tests/unit/test_cli.py
# (test_every_word_enum_offers_exactly_its_proto_enum) checks each against
# its proto enum, so a value added to a proto fails a test until it is
# offered here.


class CampaignStatus(StrEnum):
    active = "active"
    paused = "paused"
    ended = "ended"


class AffiliateStatus(StrEnum):
    active = "active"
    paused = "paused"


class CouponStatus(StrEnum):
    active = "active"
    pending = "pending"
    rejected = "rejected"
    hold = "hold"
    paused = "paused"


class CouponKind(StrEnum):
    general = "general"
    exclusive = "exclusive"
    unique = "unique"


class ConversionStatus(StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    reversed = "reversed"
    flagged = "flagged"


class Policy(StrEnum):
    coupon_first = "coupon_first"
    click_first = "click_first"


class WebhookKind(StrEnum):
    partner_postback = "partner_postback"
    events = "events"


class DeliveryState(StrEnum):
    pending = "pending"
    delivered = "delivered"
    dead = "dead"
    cancelled = "cancelled"


class Device(StrEnum):
    mobile = "mobile"
    desktop = "desktop"
    tablet = "tablet"
    other = "other"


class SegmentBy(StrEnum):
    device = "device"
    country = "country"
    channel = "channel"


# Each word enum beside the proto enum it stands for.
PROTO_ENUMS: dict[type[Enum], EnumDescriptor] = {
    SegmentBy: pb.ExperimentSegmentBy.DESCRIPTOR,
    CampaignStatus: pb.CampaignStatus.DESCRIPTOR,
    AffiliateStatus: pb.AffiliateStatus.DESCRIPTOR,
    CouponStatus: pb.CouponStatus.DESCRIPTOR,
    CouponKind: pb.CouponKind.DESCRIPTOR,
    ConversionStatus: pb.ConversionStatus.DESCRIPTOR,
    Policy: pb.AttributionPolicy.DESCRIPTOR,
    Device: pb.DeviceType.DESCRIPTOR,
    WebhookKind: pb.WebhookKind.DESCRIPTOR,
    DeliveryState: pb.DeliveryState.DESCRIPTOR,
}


def enum_prefix(descriptor: EnumDescriptor | upb.EnumDescriptor) -> str:
    """``COUPON_STATUS_`` for CouponStatus: the name of value 0 without ``UNSPECIFIED``."""
    return descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")


def enum_number(word: Enum) -> int:
    """The proto number of a word: ``CouponStatus.hold`` -> ``COUPON_STATUS_HOLD``."""
    descriptor = PROTO_ENUMS[type(word)]
    return int(descriptor.values_by_name[enum_prefix(descriptor) + str(word.value).upper()].number)


def enum_word(descriptor: EnumDescriptor | upb.EnumDescriptor, number: int) -> str:
    """For people: ``hold``; ``""`` for UNSPECIFIED, the number itself for a value newer than these stubs."""
    if number == 0:
        return ""
    value = descriptor.values_by_number.get(number)
    return value.name.removeprefix(enum_prefix(descriptor)).lower() if value else str(number)
