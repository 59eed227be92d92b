"""datetime -> google.protobuf.Timestamp without the well-known type's Python helpers.

``Timestamp.FromDatetime`` goes through ``utctimetuple`` and ``calendar.timegm``:
a click's fraud request took 10.7 µs to build with it here and 1.7 µs with
``set_timestamp``, and ExportCodes converts a million timestamps. Integer
arithmetic on the difference from the epoch gives the same value, exact to
the microsecond; setting the two fields on the message's own sub-message
avoids a merge copy.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# google.protobuf.Timestamp's own range, which is also what datetime (and so
# PostgreSQL's timestamptz as we read it) holds: 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799


def in_range(seconds: int, nanos: int) -> bool:
    """Whether a Timestamp's fields name an instant inside that range."""
    return MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < 1_000_000_000


def utcnow() -> datetime:
    """The current time, aware and in UTC: every clock of the services starts here."""
    return datetime.now(UTC)


def set_timestamp(stamp: Timestamp, at: datetime) -> None:
    """Sets ``stamp`` to ``at`` (a naive datetime is taken as UTC, as FromDatetime does)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1000


def to_timestamp(at: datetime) -> Timestamp:
    """A new Timestamp for ``at`` (``set_timestamp`` into a message's field avoids the copy)."""
    stamp = Timestamp()
    set_timestamp(stamp, at)
    return stamp
