"""The rules of reports: what a request may ask, what the sums mean, how keys read.

Pure functions, unit-tested without I/O; the SQL that sums events is in
``reports.store`` and the proto translation in ``reports.servicer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.common.errors import Violations

# Rollup rows hold 15 minutes: every zone's UTC offset is a multiple of 15
# minutes (Asia/Kolkata +05:30, Asia/Kathmandu +05:45), so a day or an hour of
# any zone is made of whole buckets and only a request's own edges need raw
# events.
BUCKET = timedelta(minutes=15)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # buckets start on multiples of BUCKET from here
MAX_RANGE = timedelta(days=400)

# Group words, in the order a row's keys are listed (the enum's words after
# REPORT_GROUP_BY_; services.common.enum_words maps them).
# "arm" (issue #17) needs an experiment_id: only an experiment's events have an arm.
GROUPS = ("campaign", "coupon", "affiliate", "channel", "sub1", "country", "device", "day", "hour", "arm")
DEVICES = ("mobile", "tablet", "desktop", "other")


@dataclass(frozen=True)
class ReportQuery:
    start: datetime
    end: datetime
    groups: tuple[str, ...]
    time_zone: str = "UTC"
    campaign_id: str = ""
    affiliate_id: str = ""
    coupon_code: str = ""
    country: str = ""
    device: str = ""
    sub1: str = ""
    experiment_id: str = ""


def report_query(
    *,
    start: datetime | None,
    end: datetime | None,
    groups: Sequence[str | None],
    time_zone: str,
    campaign_id: str = "",
    affiliate_id: str = "",
    coupon_code: str = "",
    country: str = "",
    device: str = "",
    sub1: str = "",
    experiment_id: str = "",
) -> ReportQuery:
    """A valid query, or InvalidArgument naming every bad field.

    ``groups`` holds the requested groups' words, None for a value this build
    does not know.
    """
    v = Violations()
    if start is None:
        v.add("from", "is required")
    if end is None:
        v.add("to", "is required")
    if start is not None and end is not None:
        if start >= end:
            v.add("from", "must be before to")
        elif end - start > MAX_RANGE:
            v.add("to", f"must be at most {MAX_RANGE.days} days after from")
    chosen: list[str] = []
    for group in groups:
        if group is None or group not in GROUPS:
            v.add("group_by", f"unknown group; one of {', '.join(GROUPS)}")
        elif group not in chosen:
            chosen.append(group)
    if "arm" in chosen and not experiment_id:
        v.add("experiment_id", "is required to group by arm")
    zone = time_zone or "UTC"
    if not valid_time_zone(zone):
        v.add("time_zone", "unknown time zone; an IANA name such as Europe/Berlin")
    if country and not (len(country) == 2 and country.isascii() and country.isalpha()):
        v.add("country", "must be an ISO 3166-1 alpha-2 code")
    v.raise_if_any()
    assert start is not None and end is not None
    return ReportQuery(
        start=start, end=end, groups=tuple(g for g in GROUPS if g in chosen), time_zone=zone,
        campaign_id=campaign_id, affiliate_id=affiliate_id, coupon_code=coupon_code.strip().upper(),
        country=country.upper(), device=device, sub1=sub1, experiment_id=experiment_id,
    )


def valid_time_zone(name: str) -> bool:
    if name != name.strip() or name.startswith(("/", ".")) or ".." in name:
        return False  # zoneinfo would read a path; PostgreSQL would not
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def aligned_span(start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The whole buckets inside [start, end); None when there are none."""
    whole, part = divmod(start - _EPOCH, BUCKET)
    first = _EPOCH + (whole + (1 if part else 0)) * BUCKET
    last = _EPOCH + ((end - _EPOCH) // BUCKET) * BUCKET
    return (first, last) if first < last else None


# Day blocks (migration 021): their lengths in days, longest first; a block
# starts at 00:00 UTC on a multiple of its length since _EPOCH.
BLOCK_DAYS = (32, 16, 8, 4, 2, 1)
DAY = timedelta(days=1)


def day_blocks(first: datetime, last: datetime) -> list[tuple[int, datetime]]:
    """The blocks that cover the whole UTC days [first, last) exactly, as (days, start).

    From the first day on, the longest block that starts there and ends by
    ``last``: at most two blocks of each length but the longest (from
    2026-11-07, 30 days: 1, 16, 8, 4 and 1).
    """
    found = []
    day = first
    while day < last:
        since = (day - _EPOCH) // DAY
        days = next(n for n in BLOCK_DAYS if since % n == 0 and n * DAY <= last - day)
        found.append((days, day))
        day += days * DAY
    return found


@dataclass
class Totals:
    """One row's sums, as the store adds them up (money in micros of one currency)."""

    clicks: int = 0
    unique_clicks: int = 0
    tracked_clicks: int = 0
    rejected_clicks: int = 0
    conversions: int = 0
    pending: int = 0
    approved: int = 0
    flagged: int = 0
    rejected: int = 0
    reversed: int = 0
    revenue_micros: int = 0
    discount_micros: int = 0
    payout_micros: int = 0
    refunded_micros: int = 0
    uses_taken: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


TOTAL_FIELDS = tuple(f.name for f in fields(Totals))


@dataclass(frozen=True)
class Rates:
    conversion_rate: float
    epc_micros: float
    aov_micros: float
    roas: float
    fraud_rate: float
    reversal_rate: float


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def rates(t: Totals) -> Rates:
    """The derived metrics; 0 where the denominator is 0 (no clicks, no orders)."""
    live = t.pending + t.approved
    return Rates(
        conversion_rate=_ratio(t.conversions, t.clicks),
        epc_micros=_ratio(t.payout_micros, t.clicks),
        aov_micros=_ratio(t.revenue_micros, live),
        roas=_ratio(t.revenue_micros, t.discount_micros + t.payout_micros),
        fraud_rate=_ratio(t.flagged + t.rejected, t.conversions),
        reversal_rate=_ratio(t.reversed, t.conversions),
    )


def day_key(value: object) -> str:
    """A zone's calendar day as YYYY-MM-DD (the store computes it in the zone)."""
    return str(value)


def hour_key(start: datetime, time_zone: str) -> str:
    """RFC 3339 start of the hour with the zone's offset then: the two 01:00 of a DST change differ."""
    return start.astimezone(ZoneInfo(time_zone)).isoformat()


@dataclass(frozen=True)
class Pace:
    remaining: int
    uses_per_day: float
    exhausted_at_forecast: datetime | None
    exhausted_before_valid_until: bool


def pace(remaining: int, uses_last_24h: int, now: datetime, valid_until: datetime | None) -> Pace:
    """When a limited code runs out at its trailing-24-hour pace."""
    if uses_last_24h <= 0:
        return Pace(remaining, 0.0, None, False)
    try:
        at = now + timedelta(days=remaining / uses_last_24h)
    except OverflowError:
        # A large limit at a slow pace runs out after year 9999 (no datetime,
        # no Timestamp): never in any window a code can have.
        return Pace(remaining, float(uses_last_24h), None, False)
    return Pace(
        remaining=remaining,
        uses_per_day=float(uses_last_24h),
        exhausted_at_forecast=at,
        exhausted_before_valid_until=valid_until is not None and at < valid_until,
    )


# The drift check compares every key: a click keeps its affiliate's channel at
# the time of the click (migration 014), as the rollups do.
DRIFT_GROUPS = ("campaign", "coupon", "affiliate", "channel", "sub1", "country", "device", "hour")


@dataclass(frozen=True)
class Drift:
    keys: tuple[tuple[str, str], ...]
    currency: str
    field: str
    rollup: int
    raw: int


def drift(
    rollup: Sequence[tuple[dict[str, object], str, Totals]],
    raw: Sequence[tuple[dict[str, object], str, Totals]],
) -> list[Drift]:
    """Every sum that differs between the rollups and the raw events, key by key."""

    def index(rows: Sequence[tuple[dict[str, object], str, Totals]]) -> dict[tuple[object, ...], Totals]:
        found: dict[tuple[object, ...], Totals] = {}
        for keys, currency, totals in rows:
            key = (tuple(sorted((k, str(v)) for k, v in keys.items())), currency)
            found[key] = found.get(key, Totals()) + totals
        return found

    a, b = index(rollup), index(raw)
    out = []
    for key in sorted(set(a) | set(b), key=str):
        left, right = a.get(key, Totals()), b.get(key, Totals())
        for name in TOTAL_FIELDS:
            if getattr(left, name) != getattr(right, name):
                keys, currency = key
                assert isinstance(keys, tuple) and isinstance(currency, str)
                out.append(Drift(keys, currency, name, getattr(left, name), getattr(right, name)))
    return out
