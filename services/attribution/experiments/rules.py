"""The rules of holdout experiments: validation, assignment, status. Pure, no I/O.

Assignment is a keyed hash: ``blake2b(unit key, key=experiment id)`` read as
a number, its remainder by 10,000 below ``holdout_percent * 100`` is control.
The same unit always lands in the same arm of the same experiment (repeat
clicks, AssignVariant, any replica), and arms of different experiments are
independent because the key differs. blake2b is in the standard library and
costs about a microsecond for a short key.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

from services.attribution.common.coupon_rules import is_valid_code, normalize_code
from services.attribution.common.models import ExperimentArm
from services.common import limits
from services.common.errors import Violations

# The smallest absolute lift in conversion rate a marketer cares about, when not given.
DEFAULT_MIN_DETECTABLE_EFFECT = 0.01

BUCKETS = 10_000
MIN_HOLDOUT_PERCENT = 1
MAX_HOLDOUT_PERCENT = 50
ExperimentStatus = str  # "scheduled", "running", "ended", "stopped"


@dataclass(frozen=True, slots=True)
class Experiment:
    id: str
    campaign_id: str
    coupon_code: str
    name: str
    holdout_percent: int
    starts_at: datetime
    ends_at: datetime | None
    min_detectable_effect: float
    margin_percent: float | None
    created_at: datetime
    stopped_at: datetime | None = None

    def counts_until(self) -> datetime | None:
        """The end of the counting window: the earlier of ends_at and the stop (None: open)."""
        ends = [t for t in (self.ends_at, self.stopped_at) if t is not None]
        return min(ends) if ends else None

    def running_at(self, at: datetime) -> bool:
        until = self.counts_until()
        return self.starts_at <= at and (until is None or at < until)

    def status(self, now: datetime) -> ExperimentStatus:
        if self.stopped_at is not None and (self.ends_at is None or self.stopped_at < self.ends_at):
            return "stopped"
        if self.ends_at is not None and now >= self.ends_at:
            return "ended"
        return "scheduled" if now < self.starts_at else "running"


def arm_for(experiment_id: str, unit_key: str, holdout_percent: int) -> ExperimentArm:
    """The unit's arm: deterministic in (experiment, unit), control with probability holdout_percent %."""
    digest = hashlib.blake2b(unit_key.encode(), digest_size=8, key=experiment_id.encode()).digest()
    return "control" if int.from_bytes(digest) % BUCKETS < holdout_percent * (BUCKETS // 100) else "treatment"


def visitor_key(vid: str, ip: str, user_agent: str) -> str:
    """A visitor's unit key: the link's ``vid``, else a digest of the IP and the user agent.

    The digest keeps the key short and fixed-size (the row already holds the
    IP and user agent); a vid is used as it is, so a shop that sends its
    visitor id both as ``vid`` and as AssignVariant's ``unit_id`` (and as the
    postback's ``customer_id``) gets one unit.
    """
    if vid:
        return vid
    return hashlib.blake2b(f"{ip}\x00{user_agent}".encode(), digest_size=16).hexdigest()


def validate_new(
    *,
    campaign_id: str,
    coupon_code: str,
    name: str,
    holdout_percent: int,
    starts_at: datetime | None,
    ends_at: datetime | None,
    min_detectable_effect: float,
    margin_percent: float | None,
    now: datetime,
) -> tuple[str, datetime, float]:
    """Checks a new experiment; returns (normalized code, starts_at, MDE) or raises naming every bad field."""
    violations = Violations()
    if not campaign_id:
        violations.add("experiment.campaign_id", "required")
    elif len(campaign_id.encode()) > limits.CAMPAIGN_ID:
        violations.add("experiment.campaign_id", f"longer than {limits.CAMPAIGN_ID} bytes")
    code = normalize_code(coupon_code)
    if not code:
        violations.add("experiment.coupon_code", "required")
    elif not is_valid_code(code):
        violations.add("experiment.coupon_code", "not a coupon code (3 to 64 of A-Z 0-9 - _)")
    if len(name.encode()) > limits.EXPERIMENT_NAME:
        violations.add("experiment.name", f"longer than {limits.EXPERIMENT_NAME} bytes")
    elif "\x00" in name:
        violations.add("experiment.name", "contains a NUL character")
    if not MIN_HOLDOUT_PERCENT <= holdout_percent <= MAX_HOLDOUT_PERCENT:
        violations.add("experiment.holdout_percent", f"must be {MIN_HOLDOUT_PERCENT} to {MAX_HOLDOUT_PERCENT}")
    start = starts_at or now
    if ends_at is not None and ends_at <= start:
        violations.add("experiment.ends_at", "must be after starts_at")
    if ends_at is not None and ends_at <= now:
        violations.add("experiment.ends_at", "already past")
    mde = min_detectable_effect or DEFAULT_MIN_DETECTABLE_EFFECT
    if not (math.isfinite(mde) and 0 < mde < 1):
        violations.add("experiment.min_detectable_effect", "must be between 0 and 1 (an absolute conversion rate)")
    if margin_percent is not None and not (math.isfinite(margin_percent) and 0 <= margin_percent <= 100):
        violations.add("experiment.margin_percent", "must be 0 to 100")
    violations.raise_if_any()
    return code, start, mde


def validate_unit_id(unit_id: str) -> None:
    violations = Violations()
    if not unit_id:
        violations.add("unit_id", "required")
    elif len(unit_id.encode()) > limits.UNIT_ID:
        violations.add("unit_id", f"longer than {limits.UNIT_ID} bytes")
    elif not unit_id.isprintable():
        violations.add("unit_id", "contains control characters")
    violations.raise_if_any()


def incremental_profit_micros(
    incremental_revenue_micros: int, margin_percent: float | None, discount_micros: int
) -> int | None:
    """Incremental revenue times the margin minus the discount spent (None without a margin)."""
    if margin_percent is None:
        return None
    return round(incremental_revenue_micros * margin_percent / 100) - discount_micros
