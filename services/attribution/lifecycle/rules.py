"""What happens to a conversion after it was recorded, as pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ascribe.fraud.v1 import fraud_pb2

from services.attribution.common.models import ConversionStatus
from services.attribution.common.reasons import FLAGGING_REASONS, FRAUD_UNAVAILABLE


@dataclass(frozen=True)
class Rescored:
    status: ConversionStatus
    reasons: tuple[str, ...]
    releases: bool  # gives its uses back (a rejection)


def rescore_outcome(
    reasons: Sequence[str],
    hold_until: datetime | None,
    action: fraud_pb2.VerdictAction.ValueType,
    signal_reasons: Sequence[str],
    now: datetime,
) -> Rescored:
    """A conversion flagged only because fraud was unavailable, given the verdict it now gets.

    REJECT rejects (and gives the uses back); REVIEW, or another reason that
    needs a person (a code on HOLD), keeps it FLAGGED; otherwise it goes on
    as if the verdict had come in time: PENDING, or APPROVED when its hold
    has already passed.
    """
    kept = tuple(r for r in reasons if r != FRAUD_UNAVAILABLE)
    if action == fraud_pb2.VERDICT_ACTION_REJECT:
        return Rescored("rejected", kept + tuple(signal_reasons), True)
    if action == fraud_pb2.VERDICT_ACTION_REVIEW:
        return Rescored("flagged", kept + tuple(signal_reasons), False)
    if any(r in FLAGGING_REASONS for r in kept):
        return Rescored("flagged", kept, False)
    return Rescored("approved" if hold_until is not None and hold_until <= now else "pending", kept, False)
