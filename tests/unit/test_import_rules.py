"""Reading a CSV file of existing codes (ImportCodes), without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.catalog import import_rules
from services.attribution.catalog.import_rules import CellError, parse_csv, parse_micros, parse_time
from services.common.errors import InvalidArgument


def _fields(data: bytes) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_csv(data, "cmp")
    return [field for field, _ in caught.value.violations]


def test_dates_are_rfc3339_or_whole_utc_days() -> None:
    assert parse_time("2025-09-24", end_of_day=False) == datetime(2025, 9, 24, tzinfo=UTC)
    assert parse_time("2025-09-24", end_of_day=True) == datetime(2025, 9, 25, tzinfo=UTC)
    assert parse_time("2024-12-31", end_of_day=True) == datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_time("2025-09-24T18:00:00+02:00", end_of_day=True) == datetime(2025, 9, 24, 16, tzinfo=UTC)
    # Nanosecond digits are accepted only when they add nothing PostgreSQL would drop.
    assert parse_time("2025-09-24t18:00:00.1234560z", end_of_day=False) == datetime(
        2025, 9, 24, 18, 0, 0, 123456, tzinfo=UTC
    )
    assert parse_time("2025-09-24T18:00:00.123456Z", end_of_day=False).microsecond == 123456
    for bad in ("2025-02-30", "24.09.2025", "2025-09-24T18:00", "2025-09-24T18:00:00", "2025-09-24T18:00:00.1234567Z"):
        with pytest.raises(CellError):
            parse_time(bad, end_of_day=False)


def test_money_is_exact_or_refused() -> None:
    assert parse_micros("5.10") == 5_100_000
    assert parse_micros("0.000001") == 1
    assert parse_micros("19.999999") == 19_999_999
    for bad in ("0.0000001", "-1", "NaN", "Infinity", "5,10", "1e30"):
        with pytest.raises(CellError):
            parse_micros(bad)


def test_a_file_with_a_bom_quotes_and_blank_lines() -> None:
    data = (
        "\ufeffCode,Kind,Countries,Device_Types,Allow_All_Affiliates\n"
        "one-1,unique,us; ca,mobile;tablet,\n"
        "\n"
        '"TWO-2",general,,,yes\n'
    ).encode()
    rows = parse_csv(data, "cmp")
    assert [r.line for r in rows] == [2, 4]
    first, second = (r.coupon for r in rows)
    assert (first.code, first.kind, list(first.countries)) == ("one-1", pb.COUPON_KIND_UNIQUE, ["us", "ca"])
    assert list(first.device_types) == [pb.DEVICE_TYPE_MOBILE, pb.DEVICE_TYPE_TABLET]
    assert (second.kind, second.allow_all_affiliates, second.campaign_id) == (pb.COUPON_KIND_GENERAL, True, "cmp")


def test_lines_are_counted_in_the_file_even_across_quoted_newlines() -> None:
    data = b'code,skus\nA-1,"x\ny"\nB 2,\n'
    assert _fields(data) == ["line 4.code"]


def test_each_bad_cell_is_named_by_line_and_column() -> None:
    data = b"code,kind,usage_limit,device_types\nA-1,gift,x,phone\nA-1,,,\n"
    assert _fields(data) == ["line 2.kind", "line 2.usage_limit", "line 2.device_types", "line 3.code"]
    assert _fields(b"code,discount,discount_micros\nA-1,1.00,5\n") == ["line 2.discount"]
    assert _fields(b"code,assigned_customer_id\nA-1,c\nB-2,c\n") == ["line 3.assigned_customer_id"]
    assert _fields(b"code,kind\nA-1\n") == ["line 2"]


def test_many_problems_are_summarized() -> None:
    data = b"code\n" + b"".join(b"bad code %d\n" % n for n in range(50))
    fields = _fields(data)
    assert len(fields) == import_rules.MAX_REPORTED_VIOLATIONS + 1
    assert fields[-1] == "csv"
