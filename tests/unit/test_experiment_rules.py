"""The pure rules of experiments: assignment, validation, status, profit."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from services.attribution.experiments import rules
from services.common.errors import InvalidArgument

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def test_assignment_is_deterministic_and_splits_at_the_holdout() -> None:
    arms = [rules.arm_for("exp_a", f"visitor-{n}", 30) for n in range(20_000)]
    assert arms == [rules.arm_for("exp_a", f"visitor-{n}", 30) for n in range(20_000)]
    share = arms.count("control") / len(arms)
    assert abs(share - 0.30) < 3 * math.sqrt(0.3 * 0.7 / len(arms))
    # Another experiment shuffles units independently.
    other = [rules.arm_for("exp_b", f"visitor-{n}", 30) for n in range(20_000)]
    both = sum(a == b == "control" for a, b in zip(arms, other, strict=True)) / len(arms)
    assert abs(both - 0.09) < 0.01


def test_visitor_key_is_the_vid_else_a_digest_of_ip_and_user_agent() -> None:
    assert rules.visitor_key("v1", "203.0.113.1", "UA") == "v1"
    key = rules.visitor_key("", "203.0.113.1", "UA")
    assert len(key) == 32 and key == rules.visitor_key("", "203.0.113.1", "UA")
    assert key != rules.visitor_key("", "203.0.113.1", "UA2") != rules.visitor_key("", "203.0.113.2", "UA")


def _new(**overrides: object) -> tuple[str, datetime, float]:
    values: dict[str, object] = {
        "campaign_id": "cmp", "coupon_code": "summer10", "name": "", "holdout_percent": 30, "starts_at": None,
        "ends_at": None, "min_detectable_effect": 0.0, "margin_percent": None, "now": NOW,
    }
    values.update(overrides)
    return rules.validate_new(**values)  # type: ignore[arg-type]


def test_validation_names_every_bad_field_and_fills_defaults() -> None:
    assert _new() == ("SUMMER10", NOW, 0.01)
    with pytest.raises(InvalidArgument) as bad:
        _new(campaign_id="", holdout_percent=0, ends_at=NOW - timedelta(days=1), min_detectable_effect=math.nan,
             margin_percent=101.0)
    assert {f for f, _ in bad.value.violations} == {
        "experiment.campaign_id", "experiment.holdout_percent", "experiment.ends_at",
        "experiment.min_detectable_effect", "experiment.margin_percent",
    }
    for holdout in (1, 50):
        _new(holdout_percent=holdout)
    with pytest.raises(InvalidArgument):
        _new(holdout_percent=51)


def test_status_and_counting_window() -> None:
    experiment = rules.Experiment(
        "e", "cmp", "C0DE", "", 30, NOW, NOW + timedelta(days=10), 0.01, None, NOW
    )
    assert experiment.status(NOW - timedelta(hours=1)) == "scheduled"
    assert experiment.status(NOW) == "running" and experiment.running_at(NOW)
    assert experiment.status(NOW + timedelta(days=10)) == "ended"
    assert not experiment.running_at(NOW + timedelta(days=10))
    stopped = rules.Experiment(
        "e", "cmp", "C0DE", "", 30, NOW, NOW + timedelta(days=10), 0.01, None, NOW, NOW + timedelta(days=2)
    )
    assert stopped.status(NOW + timedelta(days=3)) == "stopped"
    assert stopped.counts_until() == NOW + timedelta(days=2)


def test_incremental_profit_needs_a_margin() -> None:
    assert rules.incremental_profit_micros(100_000_000, None, 5_000_000) is None
    assert rules.incremental_profit_micros(100_000_000, 40.0, 5_000_000) == 35_000_000


def test_the_attribution_service_loads_numpy_and_scipy_only_for_a_result() -> None:
    """They cost about 85 MB of RSS: a service that serves clicks and conversions never pays it."""
    import subprocess
    import sys

    probe = "import sys, services.attribution.server; print(sorted({'numpy', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
