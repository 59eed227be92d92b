"""The caller's-deadline helper and how a batch inherits its callers' deadlines (no I/O)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from services.common import deadlines
from services.common.batcher import MicroBatcher


def test_bound_is_the_configured_deadline_without_a_caller_deadline() -> None:
    assert deadlines.bound(0.05) == 0.05


def test_bound_is_the_callers_remaining_time_less_a_margin_when_shorter() -> None:
    assert deadlines.bound(5.0, deadline=101.0, now=100.0) == pytest.approx(0.9)
    assert deadlines.bound(0.05, deadline=101.0, now=100.0) == 0.05
    # A few ms left: the 5 ms floor on the margin leaves nothing to call with.
    assert deadlines.bound(5.0, deadline=100.004, now=100.0) <= 0


def test_a_call_whose_deadline_passed_is_not_started() -> None:
    with pytest.raises(deadlines.DeadlineExceeded) as raised:
        deadlines.enter(0.0)
    assert raised.value.status.name == "DEADLINE_EXCEEDED"
    assert deadlines.caller_deadline() is None


def test_enter_and_leave_scope_the_deadline() -> None:
    token = deadlines.enter(2.0)
    try:
        at = deadlines.caller_deadline()
        assert at is not None and 1.9 < at - time.monotonic() <= 2.0
    finally:
        deadlines.leave(token)
    assert deadlines.caller_deadline() is None


def test_a_batch_runs_under_its_latest_callers_deadline() -> None:
    assert deadlines.latest([3.0, 5.0, 4.0]) == 5.0
    assert deadlines.latest([3.0, None]) is None  # one caller without a deadline: no caller bound


async def test_the_batchers_flush_sees_the_latest_deadline_not_the_schedulers() -> None:
    seen: list[float | None] = []

    async def flush(items: Sequence[int]) -> list[int]:
        seen.append(deadlines.caller_deadline())
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(flush)

    async def caller(item: int, remaining: float | None) -> int:
        token = deadlines.enter(remaining)
        try:
            return await batcher.submit(item)
        finally:
            deadlines.leave(token)

    before = time.monotonic()
    assert list(await asyncio.gather(caller(1, 1.0), caller(2, 3.0))) == [1, 2]
    assert len(seen) == 1 and seen[0] is not None and 2.9 < seen[0] - before < 3.1
    # A later batch of callers without deadlines: none inherited from the first.
    assert await caller(3, None) == 3
    assert seen[1] is None
    await batcher.close()


async def test_a_background_task_does_not_inherit_its_rpcs_deadline() -> None:
    seen: list[float | None] = []

    async def later() -> None:
        seen.append(deadlines.caller_deadline())

    token = deadlines.enter(1.0)
    try:
        await asyncio.get_running_loop().create_task(later())
        await asyncio.get_running_loop().create_task(later(), context=deadlines.background_context())
    finally:
        deadlines.leave(token)
    assert seen[0] is not None and seen[1] is None
