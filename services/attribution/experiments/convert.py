"""Experiments: domain values <-> protos."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from services.attribution.common.models import ExperimentArm
from services.attribution.experiments.rules import Experiment
from services.common.enum_words import EnumWords
from services.common.errors import InvalidArgument
from services.common.timestamps import in_range, set_timestamp

if TYPE_CHECKING:  # numpy and scipy load with the first result, not with the service (about 85 MB)
    from services.attribution.experiments.results import ArmTotals, ExperimentOutcome
    from services.attribution.experiments.stats import Lift

ARM_WORDS = EnumWords(pb.ExperimentArm, "EXPERIMENT_ARM_")
STATUS_WORDS = EnumWords(pb.ExperimentStatus, "EXPERIMENT_STATUS_")
SEGMENT_WORDS = EnumWords(pb.ExperimentSegmentBy, "EXPERIMENT_SEGMENT_BY_")


def arm_to_proto(arm: ExperimentArm | None) -> pb.ExperimentArm.ValueType:
    return ARM_WORDS.number_or_unspecified(arm)


def segment_by_from_proto(value: int) -> str:
    """'' (no segments), 'device', 'country' or 'channel'; an unknown number is INVALID_ARGUMENT."""
    if value == 0:
        return ""
    word = SEGMENT_WORDS.words.get(value)
    if word is None:
        raise InvalidArgument.one("segment_by", "not a known segmentation")
    return word


def optional_time(stamp: Timestamp, present: bool, field: str) -> datetime | None:
    if not present:
        return None
    if not in_range(stamp.seconds, stamp.nanos):
        raise InvalidArgument.one(field, "not a valid timestamp")
    return stamp.ToDatetime(tzinfo=UTC)


def experiment_to_proto(experiment: Experiment, now: datetime) -> pb.Experiment:
    message = pb.Experiment(
        id=experiment.id,
        campaign_id=experiment.campaign_id,
        coupon_code=experiment.coupon_code,
        name=experiment.name,
        holdout_percent=experiment.holdout_percent,
        min_detectable_effect=experiment.min_detectable_effect,
        status=STATUS_WORDS.number(experiment.status(now)),
    )
    if experiment.margin_percent is not None:
        message.margin_percent = experiment.margin_percent
    set_timestamp(message.starts_at, experiment.starts_at)
    set_timestamp(message.created_at, experiment.created_at)
    if experiment.ends_at is not None:
        set_timestamp(message.ends_at, experiment.ends_at)
    if experiment.stopped_at is not None:
        set_timestamp(message.stopped_at, experiment.stopped_at)
    return message


def arm_result_to_proto(totals: ArmTotals) -> pb.ExperimentArmResult:
    return pb.ExperimentArmResult(
        arm=arm_to_proto(totals.arm),
        units=totals.units,
        conversions=totals.conversions,
        conversion_rate=totals.conversion_rate,
        revenue_per_unit_micros=totals.revenue_per_unit_micros,
        discount_micros=totals.discount_micros,
        revenue_micros=totals.revenue_micros,
        contaminated_conversions=totals.contaminated,
    )


def lift_to_proto(lift: Lift, *, micros: bool = False) -> pb.Lift:
    """Revenue lifts are micros per unit: whole micros (NaN, no interval yet, stays NaN)."""

    def value(v: float) -> float:
        return float(round(v)) if micros and math.isfinite(v) else v

    return pb.Lift(
        absolute=value(lift.absolute),
        relative=lift.relative,
        ci_low=value(lift.ci_low),
        ci_high=value(lift.ci_high),
        fixed_ci_low=value(lift.fixed_ci_low),
        fixed_ci_high=value(lift.fixed_ci_high),
        p_value=lift.p_value,
    )


def result_to_proto(
    experiment: Experiment, outcome: ExperimentOutcome, currency: str, now: datetime
) -> pb.ExperimentResult:
    message = pb.ExperimentResult(
        experiment=experiment_to_proto(experiment, now),
        arms=[arm_result_to_proto(a) for a in outcome.arms],
        conversion_lift=lift_to_proto(outcome.conversion_lift),
        revenue_lift=lift_to_proto(outcome.revenue_lift, micros=True),
        incremental_conversions=outcome.incremental_conversions,
        incremental_revenue_micros=outcome.incremental_revenue_micros,
        contamination_rate=outcome.contamination_rate,
        ready=outcome.ready,
        min_detectable_effect=experiment.min_detectable_effect,
        currency=currency,
        segments=[
            pb.ExperimentSegment(
                segment=s.name,
                arms=[arm_result_to_proto(a) for a in s.arms],
                conversion_lift=lift_to_proto(s.lift.lift),
                incremental=s.lift.incremental,
                not_incremental=s.lift.not_incremental,
            )
            for s in outcome.segments
        ],
        incremental_segments=[s.name for s in outcome.segments if s.lift.incremental],
        not_incremental_segments=[s.name for s in outcome.segments if s.lift.not_incremental],
    )
    if outcome.incremental_profit_micros is not None:
        message.incremental_profit_micros = outcome.incremental_profit_micros
    set_timestamp(message.computed_at, now)
    return message
