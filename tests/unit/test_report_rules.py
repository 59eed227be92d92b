"""Report rules without I/O: requests, buckets, keys, derived metrics, pace, drift."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.common.models import Click
from services.attribution.conversions.rules import ConversionInput, StaticJudgment, report_dimensions
from services.attribution.reports import rules
from services.attribution.reports.servicer import add_rows
from services.common.errors import InvalidArgument

T = datetime(2026, 11, 1, 5, 0, tzinfo=UTC)


def query(**fields: object) -> rules.ReportQuery:
    values: dict[str, object] = {"start": T, "end": T + timedelta(days=1), "groups": [], "time_zone": ""}
    values.update(fields)
    return rules.report_query(**values)  # type: ignore[arg-type]


def test_a_query_keeps_groups_in_key_order_once_and_defaults_to_utc() -> None:
    q = query(groups=["hour", "coupon", "coupon", "campaign"], coupon_code=" save ", country="de")
    assert q.groups == ("campaign", "coupon", "hour")
    assert (q.time_zone, q.coupon_code, q.country) == ("UTC", "SAVE", "DE")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"end": T}, "from"),
        ({"end": T - timedelta(seconds=1)}, "from"),
        ({"end": T + timedelta(days=400, seconds=1)}, "to"),
        ({"start": None}, "from"),
        ({"groups": [None]}, "group_by"),
        ({"groups": ["week"]}, "group_by"),
        ({"groups": ["arm"]}, "experiment_id"),  # only an experiment's events have an arm
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"time_zone": "../etc/passwd"}, "time_zone"),
        ({"country": "DEU"}, "country"),
    ],
)
def test_bad_queries_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        query(**fields)
    assert field in [f for f, _ in bad.value.violations]


def test_arm_groups_an_experiment_report() -> None:
    assert query(groups=["arm", "day"], experiment_id="exp").groups == ("day", "arm")


def test_exactly_400_days_is_allowed() -> None:
    assert query(end=T + timedelta(days=400)).end == T + timedelta(days=400)


def test_aligned_span_holds_only_whole_buckets() -> None:
    assert rules.aligned_span(T, T + timedelta(hours=1)) == (T, T + timedelta(hours=1))
    assert rules.aligned_span(T + timedelta(microseconds=1), T + timedelta(minutes=44)) == (
        T + timedelta(minutes=15), T + timedelta(minutes=30)
    )
    assert rules.aligned_span(T + timedelta(minutes=1), T + timedelta(minutes=14)) is None


def test_hour_keys_carry_the_offset_so_dst_hours_differ() -> None:
    first = rules.hour_key(datetime(2026, 11, 1, 5, 0, tzinfo=UTC), "America/New_York")
    second = rules.hour_key(datetime(2026, 11, 1, 6, 0, tzinfo=UTC), "America/New_York")
    assert (first, second) == ("2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00")
    assert rules.hour_key(datetime(2026, 11, 1, 18, 15, tzinfo=UTC), "Asia/Kathmandu") == "2026-11-02T00:00:00+05:45"


def test_rates_are_zero_without_a_denominator() -> None:
    assert rules.rates(rules.Totals()) == rules.Rates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    t = rules.Totals(clicks=10, conversions=4, pending=1, approved=1, flagged=1, reversed=1,
                     revenue_micros=100, discount_micros=10, payout_micros=40)
    r = rules.rates(t)
    assert (r.conversion_rate, r.epc_micros, r.aov_micros, r.roas) == (0.4, 4.0, 50.0, 2.0)
    assert (r.fraud_rate, r.reversal_rate) == (0.25, 0.25)


def test_pace_forecasts_exhaustion_at_the_trailing_rate() -> None:
    p = rules.pace(10, 5, T, T + timedelta(days=3))
    assert p.exhausted_at_forecast == T + timedelta(days=2) and p.exhausted_before_valid_until
    assert not rules.pace(10, 5, T, T + timedelta(days=1)).exhausted_before_valid_until
    assert rules.pace(10, 0, T, None) == rules.Pace(10, 0.0, None, False)


def test_a_pace_past_year_9999_has_no_forecast() -> None:
    """A 10M-use code used once a day ran out after 9999: OverflowError, GetReport by coupon INTERNAL."""
    assert rules.pace(10_000_000, 1, T, T + timedelta(days=30)) == rules.Pace(10_000_000, 1.0, None, False)
    assert rules.pace(2**62, 1, T, None) == rules.Pace(2**62, 1.0, None, False)


def test_drift_names_each_differing_sum() -> None:
    keys: dict[str, object] = {"campaign": "c"}
    same = [(keys, "EUR", rules.Totals(clicks=2))]
    assert rules.drift(same, [(keys, "EUR", rules.Totals(clicks=1)), (keys, "EUR", rules.Totals(clicks=1))]) == []
    found = rules.drift(same, [(keys, "EUR", rules.Totals(clicks=1, payout_micros=5))])
    assert [(d.field, d.rollup, d.raw) for d in found] == [("clicks", 2, 1), ("payout_micros", 0, 5)]


def _input(**fields: object) -> ConversionInput:
    values: dict[str, object] = {
        "campaign_id": "c", "order_id": "o", "amount_micros": 1, "currency": "EUR",
        "received_at": T, "occurred_at": T, "discount_micros": 0, "occurred_at_sent": True,
    }
    values.update(fields)
    return ConversionInput(**values)  # type: ignore[arg-type]


def test_a_conversion_is_reported_under_its_own_country_else_its_clicks() -> None:
    click = Click("k", T, "c", "a1", T, "accepted", country="DE", device_type="mobile", subs=("s1", "", "", "", ""))
    credited = StaticJudgment(reasons=[], affiliate_id="a1", source="click", click=click, coupon=None, channel="social")
    assert report_dimensions(_input(), credited) == {
        "country": "DE", "device": "mobile", "channel": "social", "sub1": "s1",
    }
    assert report_dimensions(_input(country="FR", device_type="desktop"), credited)["country"] == "FR"
    nobody = StaticJudgment(reasons=[], affiliate_id=None, source="none", click=None, coupon=None)
    assert report_dimensions(_input(), nobody) == {"country": "", "device": "", "channel": "direct", "sub1": ""}


def test_export_and_get_report_requests_hold_the_same_fields() -> None:
    from ascribe.attribution.v1 import attribution_pb2 as pb

    def shape(message: object) -> list[tuple[str, int, int, str]]:
        descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
        return [
            (f.name, f.number, f.type, str(f.GetOptions()).strip()) for f in descriptor.fields
        ]

    assert shape(pb.ExportReportRequest) == shape(pb.GetReportRequest)


def test_rows_are_filled_from_records_field_by_field() -> None:
    # add_rows unpacks a record by position: a reordered rules.TOTAL_FIELDS must fail here.
    q = query(groups=["coupon", "hour"], time_zone="Asia/Kathmandu")
    values = tuple(range(1, len(rules.TOTAL_FIELDS) + 1))
    answer = pb.GetReportResponse()
    add_rows(q, [("SAVE", datetime(2026, 3, 1, 6, 15, tzinfo=UTC), "EUR", *values)], answer.rows)
    (row,) = answer.rows
    assert dict(row.keys) == {"coupon": "SAVE", "hour": "2026-03-01T12:00:00+05:45"}
    assert row.metrics.currency == "EUR"
    assert [getattr(row.metrics, name) for name in rules.TOTAL_FIELDS] == list(values)
    assert row.metrics.conversion_rate == pytest.approx(5 / 1)  # conversions / clicks


@pytest.mark.parametrize("seed", range(5))
def test_rows_carry_their_totals_and_the_rates_of_rules_rates(seed: int) -> None:
    # add_rows computes the rates inline and leaves zeros unset (for speed):
    # every row must read back its totals and rules.rates, zeros included.
    import random

    rng = random.Random(seed)
    totals = [
        [rng.choice([0, 0, 1, rng.randrange(1, 10**12)]) for _ in rules.TOTAL_FIELDS] for _ in range(300)
    ]
    answer = pb.GetReportResponse()
    add_rows(query(groups=[]), [("EUR", *t) for t in totals], answer.rows)
    for values, row in zip(totals, answer.rows, strict=True):
        assert [getattr(row.metrics, name) for name in rules.TOTAL_FIELDS] == values
        expected = rules.rates(rules.Totals(*values))
        assert [getattr(row.metrics, f) for f in vars(expected)] == list(vars(expected).values())


def test_day_blocks_cover_every_run_of_whole_days_exactly_with_aligned_blocks() -> None:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    for offset in range(-40, 70):
        for length in range(1, 100):
            first = base + timedelta(days=offset)
            last = first + timedelta(days=length)
            blocks = rules.day_blocks(first, last)
            day = first
            for days, start in blocks:
                assert start == day and days in rules.BLOCK_DAYS
                assert (start - epoch).days % days == 0  # where migration 021's date_bin puts it
                day += timedelta(days=days)
            assert day == last
            # at most two blocks of each length but the longest
            counts = Counter(days for days, _ in blocks if days != max(rules.BLOCK_DAYS))
            assert not counts or max(counts.values()) <= 2
            if length >= 64:
                assert 32 in dict(blocks)


def test_day_blocks_stop_at_the_last_day_a_datetime_can_hold() -> None:
    # a 32-day block from 9999-12-28 would end past datetime.max: no OverflowError, only shorter blocks
    last = datetime(9999, 12, 31, tzinfo=UTC)
    blocks = rules.day_blocks(last - timedelta(days=3), last)
    assert sum(days for days, _ in blocks) == 3 and all(days < 4 for days, _ in blocks)
