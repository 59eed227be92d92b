"""Click and conversion ids: URL-safe, time-carrying, unguessable, strict to parse."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from services.attribution.common.ids import (
    ID_LENGTH,
    RANDOM_BYTES,
    click_created_at,
    conversion_created_at,
    new_click_id,
    new_conversion_id,
    truncate_to_id_precision,
)

URL_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def test_click_id_is_url_safe_and_carries_its_time_to_the_millisecond() -> None:
    now = datetime(2025, 6, 26, 12, 34, 56, 789_654, tzinfo=UTC)
    click_id = new_click_id(now)
    assert len(click_id) == ID_LENGTH
    assert URL_SAFE.fullmatch(click_id)
    assert click_created_at(click_id) == datetime(2025, 6, 26, 12, 34, 56, 789_000, tzinfo=UTC)
    assert click_created_at(click_id) == truncate_to_id_precision(now)


def test_ids_have_at_least_96_random_bits() -> None:
    assert RANDOM_BYTES * 8 >= 96
    now = datetime.now(UTC)
    generated = {new_click_id(now) for _ in range(10_000)}
    assert len(generated) == 10_000


def test_ids_sort_by_creation_time() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    times = [start + timedelta(milliseconds=ms) for ms in (0, 1, 2, 999, 1000, 86_400_000, 10**12)]
    made = [new_click_id(t) for t in times]
    assert made == sorted(made)


def test_naive_times_are_taken_as_utc() -> None:
    naive = datetime(2025, 6, 26, 0, 0, 0, 5_000)
    assert click_created_at(new_click_id(naive)) == naive.replace(tzinfo=UTC)


def test_conversion_ids_share_the_format() -> None:
    now = datetime(2030, 2, 3, 4, 5, 6, 7_000, tzinfo=UTC)
    conversion_id = new_conversion_id(now)
    assert len(conversion_id) == ID_LENGTH and URL_SAFE.fullmatch(conversion_id)
    assert conversion_created_at(conversion_id) == now


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "x" * 23, "x" * 25, "!" * 24, "a+b/" + "A" * 20, "é" * 24, " " + "A" * 23, "A" * 23 + "="],
)
def test_malformed_ids_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        click_created_at(bad)


def test_an_id_whose_time_is_out_of_range_is_malformed() -> None:
    # The largest 48-bit millisecond count lies past year 9999.
    with pytest.raises(ValueError):
        click_created_at("z" * ID_LENGTH)


def test_times_before_the_epoch_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        new_click_id(datetime(1969, 12, 31, tzinfo=UTC))
