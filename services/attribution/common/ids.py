"""Ids of clicks and conversions: URL-safe, time-ordered, unguessable.

An id is 18 bytes (a 48-bit count of milliseconds since the Unix epoch, then
96 random bits) written as 24 characters of a URL-safe alphabet sorted in
ASCII order, so ids sort by creation time as plain strings.

The creation time is part of the id because ``clicks`` is partitioned by it:
whoever holds a click id can name its partition (``WHERE click_id = $1 AND
created_at = $2`` reads one partition, not all of them), and a click's row is
stored with exactly the ``created_at`` its id encodes (millisecond precision).
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta

ID_LENGTH = 24
RANDOM_BYTES = 12  # 96 bits: guessing a live id is hopeless
_TIME_BYTES = 6  # milliseconds until the year 10889
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)

# base64url's alphabet and the same 64 characters in ASCII order.
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SORTED = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_SORTED = bytes.maketrans(_B64, _SORTED)
_FROM_SORTED = bytes.maketrans(_SORTED, _B64)
_ALPHABET = frozenset(_SORTED.decode())


def _milliseconds(at: datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # our clocks are UTC; a naive time is taken as such
    return (at - _EPOCH) // _MILLISECOND


def truncate_to_id_precision(at: datetime) -> datetime:
    """``at`` as an id records it (UTC, whole milliseconds)."""
    return _EPOCH + _milliseconds(at) * _MILLISECOND


def _new_id(at: datetime) -> str:
    ms = _milliseconds(at)
    if not 0 <= ms < 1 << (8 * _TIME_BYTES):
        raise ValueError(f"time {at!r} cannot be encoded in an id")
    raw = ms.to_bytes(_TIME_BYTES, "big") + os.urandom(RANDOM_BYTES)
    return base64.urlsafe_b64encode(raw).translate(_TO_SORTED).decode("ascii")


def _created_at(value: str) -> datetime:
    if len(value) != ID_LENGTH or not _ALPHABET.issuperset(value):
        raise ValueError("malformed id")
    raw = base64.urlsafe_b64decode(value.encode("ascii").translate(_FROM_SORTED))
    ms = int.from_bytes(raw[:_TIME_BYTES], "big")
    try:
        return _EPOCH + ms * _MILLISECOND
    except OverflowError as error:
        raise ValueError("malformed id: time out of range") from error


def new_click_id(now: datetime) -> str:
    """A new click id carrying ``now`` (to the millisecond)."""
    return _new_id(now)


def click_created_at(click_id: str) -> datetime:
    """The creation time a click id carries (UTC); ValueError when malformed."""
    return _created_at(click_id)


def new_conversion_id(now: datetime) -> str:
    """A new conversion id, in the same format as click ids."""
    return _new_id(now)


def conversion_created_at(conversion_id: str) -> datetime:
    """The creation time a conversion id carries (UTC); ValueError when malformed."""
    return _created_at(conversion_id)
