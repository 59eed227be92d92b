"""An experiment's result from the per-arm, per-segment aggregates: pure, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.attribution.common.models import ExperimentArm
from services.attribution.experiments import stats
from services.attribution.experiments.rules import Experiment, incremental_profit_micros
from services.attribution.experiments.stats import Lift, Moments, SegmentLift
from services.attribution.experiments.store import ArmAggregate

ARMS: tuple[ExperimentArm, ExperimentArm] = ("treatment", "control")


@dataclass(frozen=True, slots=True)
class ArmTotals:
    arm: ExperimentArm
    units: int = 0
    conversions: int = 0
    conversions_sq: int = 0
    revenue_micros: int = 0
    revenue_sq: float = 0.0
    discount_micros: int = 0
    contaminated: int = 0

    def plus(self, row: ArmAggregate) -> ArmTotals:
        return ArmTotals(
            self.arm,
            self.units + row.units,
            self.conversions + row.conversions,
            self.conversions_sq + row.conversions_sq,
            self.revenue_micros + row.revenue_micros,
            self.revenue_sq + row.revenue_sq,
            self.discount_micros + row.discount_micros,
            self.contaminated + row.contaminated,
        )

    @property
    def conversion_rate(self) -> float:
        return self.conversions / self.units if self.units else 0.0

    @property
    def revenue_per_unit_micros(self) -> int:
        return round(self.revenue_micros / self.units) if self.units else 0

    def conversion_moments(self) -> Moments:
        return Moments(self.units, self.conversions, self.conversions_sq)

    def revenue_moments(self) -> Moments:
        return Moments(self.units, self.revenue_micros, self.revenue_sq)


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    arms: tuple[ArmTotals, ArmTotals]  # treatment, control
    lift: SegmentLift


@dataclass(frozen=True, slots=True)
class ExperimentOutcome:
    arms: tuple[ArmTotals, ArmTotals]  # treatment, control
    conversion_lift: Lift
    revenue_lift: Lift
    incremental_conversions: float
    incremental_revenue_micros: int
    incremental_profit_micros: int | None
    contamination_rate: float
    ready: bool
    segments: tuple[Segment, ...]


def _totals(rows: list[ArmAggregate]) -> tuple[ArmTotals, ArmTotals]:
    by_arm = {arm: ArmTotals(arm) for arm in ARMS}
    for row in rows:
        by_arm[row.arm] = by_arm[row.arm].plus(row)
    return by_arm["treatment"], by_arm["control"]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def outcome(experiment: Experiment, rows: list[ArmAggregate], segmented: bool) -> ExperimentOutcome:
    mde = experiment.min_detectable_effect
    treatment, control = _totals(rows)
    conversion_lift = stats.lift(
        treatment.conversion_moments(), control.conversion_moments(), stats.mixture_variance(mde)
    )
    tau2 = stats.revenue_mixture_variance(
        mde, control.revenue_moments(), control.conversions, treatment.revenue_moments(), treatment.conversions
    )
    revenue_lift = stats.lift(treatment.revenue_moments(), control.revenue_moments(), tau2)
    conversion_gap = treatment.conversion_rate - control.conversion_rate
    revenue_gap = (
        treatment.revenue_micros / treatment.units - control.revenue_micros / control.units
        if treatment.units and control.units
        else 0.0
    )
    incremental_revenue = round(revenue_gap * treatment.units)
    segments: tuple[Segment, ...] = ()
    if segmented:
        names = sorted({row.segment for row in rows})
        per_segment = {name: _totals([r for r in rows if r.segment == name]) for name in names}
        lifts = stats.segment_lifts(
            [(name, t.conversion_moments(), c.conversion_moments()) for name, (t, c) in per_segment.items()], mde
        )
        segments = tuple(Segment(s.name, per_segment[s.name], s) for s in lifts)
    return ExperimentOutcome(
        arms=(treatment, control),
        conversion_lift=conversion_lift,
        revenue_lift=revenue_lift,
        incremental_conversions=_finite(conversion_gap * treatment.units) if control.units else 0.0,
        incremental_revenue_micros=incremental_revenue,
        incremental_profit_micros=incremental_profit_micros(
            incremental_revenue, experiment.margin_percent, treatment.discount_micros
        ),
        contamination_rate=control.contaminated / control.conversions if control.conversions else 0.0,
        ready=stats.is_ready(conversion_lift, mde),
        segments=segments,
    )
