"""The click path's set of open experiments: loads, reloads, invalidation, failures (the loader faked; no I/O)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.attribution.experiments.assignment import ClickAssigner, ExperimentCache
from services.attribution.experiments.rules import Experiment, arm_for, visitor_key

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _experiment(code: str, **overrides: object) -> Experiment:
    values: dict[str, object] = {
        "id": f"exp_{code}", "campaign_id": "cmp", "coupon_code": code, "name": "", "holdout_percent": 30,
        "starts_at": NOW - timedelta(days=1), "ends_at": None, "min_detectable_effect": 0.01,
        "margin_percent": None, "created_at": NOW,
    }
    values.update(overrides)
    return Experiment(**values)  # type: ignore[arg-type]


class Scripted(ExperimentCache):
    """Answers the sets it is given, one per load (an exception is raised instead)."""

    def __init__(self, ttl_seconds: float, *answers: list[Experiment] | BaseException) -> None:
        super().__init__(None, ttl_seconds)  # type: ignore[arg-type]  # never queries
        self.answers = list(answers)
        self.loads = 0

    async def _load(self) -> dict[tuple[str, str], Experiment]:
        self.loads += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return {(e.campaign_id, e.coupon_code): e for e in answer}


async def test_the_first_lookup_waits_later_ones_use_the_set_until_it_expires() -> None:
    cache = Scripted(3600, [_experiment("A")], [])
    assert (await cache.find("cmp", "A")) is not None
    assert (await cache.find("cmp", "B")) is None
    assert cache.loads == 1
    # Invalidated (this replica changed an experiment): the next lookup waits for the new set.
    cache.invalidate()
    assert (await cache.find("cmp", "A")) is None and cache.loads == 2


async def test_an_expired_set_serves_while_one_reload_runs_and_a_failed_reload_keeps_it() -> None:
    cache = Scripted(0.01, [_experiment("A")], OSError("down"), [])
    assert (await cache.find("cmp", "A")) is not None
    await asyncio.sleep(0.02)
    # Expired: the old set answers at once, whatever the reload does.
    assert (await cache.find("cmp", "A")) is not None
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert cache.loads == 2  # the reload failed: the set stays
    assert (await cache.find("cmp", "A")) is not None
    await asyncio.sleep(0.02)
    await cache.find("cmp", "A")
    for _ in range(3):
        await asyncio.sleep(0)
    assert (await cache.find("cmp", "A")) is None  # the third load emptied it


async def test_caching_off_reads_every_time() -> None:
    cache = Scripted(0, [_experiment("A")], [])
    assert (await cache.find("cmp", "A")) is not None
    assert (await cache.find("cmp", "A")) is None
    assert cache.loads == 2


@pytest.mark.parametrize(
    ("code", "decision", "expect_arm"),
    [("A", "accepted", True), ("A", "flagged", True), ("A", "rejected", False), ("", "accepted", False),
     ("B", "accepted", False), ("LATE", "accepted", False)],
)
async def test_which_clicks_join_an_arm(code: str, decision: str, expect_arm: bool) -> None:
    cache = Scripted(3600, [_experiment("A"), _experiment("LATE", starts_at=NOW + timedelta(hours=1))])
    arm = await ClickAssigner(None, cache).assign(  # type: ignore[arg-type]
        campaign_id="cmp", tracked_code=code, decision=decision,  # type: ignore[arg-type]
        vid="", ip="203.0.113.1", user_agent="UA", at=NOW,
    )
    assert (arm is not None) == expect_arm
    if arm is not None:
        key = visitor_key("", "203.0.113.1", "UA")
        assert arm.unit_key == key and arm.arm == arm_for("exp_A", key, 30)


async def test_experiments_unavailable_means_no_arm_not_a_failed_click() -> None:
    cache = Scripted(3600, OSError("PostgreSQL is down"))
    arm = await ClickAssigner(None, cache).assign(  # type: ignore[arg-type]
        campaign_id="cmp", tracked_code="A", decision="accepted", vid="v", ip="", user_agent="", at=NOW
    )
    assert arm is None
