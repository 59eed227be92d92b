"""set_timestamp gives what Timestamp.FromDatetime gives, to the microsecond."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.timestamps import set_timestamp, to_timestamp


@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 11, 22, 5, 57, 3, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch: nanos stay positive
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 2, 30, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 11, 22, 5, 57, 3, 42),  # naive: taken as UTC
    ],
)
def test_same_as_from_datetime(at: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(at)
    got = Timestamp()
    set_timestamp(got, at)
    assert (got.seconds, got.nanos) == (expected.seconds, expected.nanos)
    assert to_timestamp(at) == expected
    aware = at if at.tzinfo else at.replace(tzinfo=UTC)
    assert got.ToDatetime(tzinfo=UTC) == aware
