"""datetime -> google.protobuf.Timestamp without the well-known type's Python helpers.

``Timestamp.FromDatetime`` goes through ``utctimetuple`` and ``calendar.timegm``:
about 9 µs a call here, paid for every click on its way to the fraud service.
Integer arithmetic on the difference from the epoch gives the same value,
exact to the microsecond, and setting the two fields on the message's own
sub-message avoids a merge copy.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(stamp: Timestamp, at: datetime) -> None:
    """Sets ``stamp`` to ``at`` (a naive datetime is taken as UTC, as FromDatetime does)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1000
