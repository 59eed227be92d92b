"""The statistics of a holdout experiment: pure, vectorised, no I/O.

Everything here works on the sufficient statistics of each arm (``Moments``:
units, the sum of a per-unit value and the sum of its squares), so one SQL
aggregate per arm or segment is all the data it needs, and the same code runs
on numpy arrays of many simulated experiments at once (the simulation tests).

Two intervals for a lift (treatment minus control):

- fixed-horizon: the normal (Welch) interval ``est +- z * sqrt(V)`` with
  ``V = s_t^2 / n_t + s_c^2 / n_c``; valid only when looked at once, at a
  sample size chosen in advance;
- always-valid: the normal-mixture confidence sequence behind the mixture
  SPRT (Robbins 1970; Johari, Koomen, Pekelis and Walsh, "Always valid
  inference", 2017/2022; Howard et al. 2021). With a N(0, tau^2) mixture over
  the lift, the likelihood ratio of the estimate against a lift ``theta0`` is
  ``sqrt(V / (V + tau^2)) * exp(tau^2 (est - theta0)^2 / (2 V (V + tau^2)))``,
  a nonnegative martingale under ``theta0``; by Ville's inequality it passes
  ``1 / alpha`` with probability at most alpha ever, however often it is
  looked at. The lifts it never rejects form the interval
  ``est +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))``.
  The variance is the plug-in estimate, as in Johari et al.

Tuning the mixture (``mixture_variance``). The always-valid interval is wider
than the fixed one by a factor that depends only on ``x = tau^2 / V``:
``ratio(x) = sqrt((1 + x) / x * (2 log(1/alpha) + log(1 + x))) / z``. We want
it narrowest where it matters: at the sample size that detects the minimum
detectable effect (MDE), i.e. where a fixed test at 95 % and 80 % power just
detects it, ``V* = (MDE / (z_0.975 + z_0.8))^2``. So ``tau^2 = x* V*`` with
``x*`` the minimiser of ``ratio`` (found numerically with scipy): for alpha
0.05 ``x*`` is about 8 and the ratio there about 1.55, below the 2 the
product asks for (``TUNED_WIDTH_RATIO``; a unit test holds it).

Revenue per unit uses the same mixture, its MDE being the conversion MDE
times the revenue of a converting unit (the control's, plug-in; the
treatment's when control has none), so both lifts are tuned to the same
sample size.

Segments: each segment's lift gets an always-valid p-value (``1 / ratio`` at
zero lift, capped at 1); Benjamini-Hochberg (scipy) selects the segments
where the coupon is incremental at a false discovery rate of 5 %, and every
segment's interval is widened to the level ``1 - R alpha / m`` (R selected of
m; Benjamini and Yekutieli's false-coverage-rate intervals), which makes a
selected segment's interval exclude zero. A segment whose corrected interval
lies below the MDE is named as not incremental: whatever its lift, it is
smaller than the smallest the marketer cares about.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8

Array = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Moments:
    """One arm's sufficient statistics: units, sum of a per-unit value, sum of its squares.

    Scalars for one experiment, numpy arrays (broadcast together) for many.
    """

    n: Any
    total: Any
    total_sq: Any


def mean_and_variance(m: Moments) -> tuple[Array, Array]:
    """The per-unit mean and the variance of that mean (unbiased; NaN below 2 units)."""
    n = np.asarray(m.n, dtype=np.float64)
    total = np.asarray(m.total, dtype=np.float64)
    total_sq = np.asarray(m.total_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        sample_var = np.where(n > 1, np.maximum(total_sq - total * mean, 0.0) / (n - 1), np.nan)
        return mean, sample_var / n


def difference(treatment: Moments, control: Moments) -> tuple[Array, Array, Array]:
    """(treatment mean minus control mean, the variance of that difference, control mean)."""
    mean_t, var_t = mean_and_variance(treatment)
    mean_c, var_c = mean_and_variance(control)
    return mean_t - mean_c, var_t + var_c, mean_c


def z_value(alpha: Any) -> Array:
    return np.asarray(stats.norm.ppf(1 - np.asarray(alpha, dtype=np.float64) / 2))


def fixed_interval(estimate: Any, variance: Any, alpha: Any = ALPHA) -> tuple[Array, Array]:
    """The fixed-horizon (Welch, normal) interval: valid when looked at once."""
    half = z_value(alpha) * np.sqrt(variance)
    return estimate - half, estimate + half


def _floor(variance: Any) -> Array:
    # A zero variance (no conversion in either arm yet) would make the mixture
    # degenerate; a tiny floor keeps the interval defined, and very wide.
    return np.maximum(np.asarray(variance, dtype=np.float64), 1e-300)


def always_valid_interval(estimate: Any, variance: Any, tau2: Any, alpha: Any = ALPHA) -> tuple[Array, Array]:
    """The normal-mixture confidence sequence at the current sample (see the module doc)."""
    v = _floor(variance)
    tau2 = np.asarray(tau2, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    half = np.sqrt(v * (v + tau2) / tau2 * (2 * np.log(1 / alpha) + np.log((v + tau2) / v)))
    return estimate - half, estimate + half


def always_valid_p_value(estimate: Any, variance: Any, tau2: Any) -> Array:
    """``1 / likelihood ratio`` at zero lift, capped at 1: below alpha exactly when the interval excludes 0."""
    v = _floor(variance)
    tau2 = np.asarray(tau2, dtype=np.float64)
    log_ratio = 0.5 * np.log(v / (v + tau2)) + tau2 * np.square(estimate) / (2 * v * (v + tau2))
    return np.asarray(np.exp(-np.maximum(log_ratio, 0.0)))


def width_ratio(x: float, alpha: float = ALPHA) -> float:
    """How much wider the always-valid interval is than the fixed one when ``tau^2 = x V``."""
    return math.sqrt((1 + x) / x * (2 * math.log(1 / alpha) + math.log1p(x))) / float(z_value(alpha))


@functools.cache
def best_mixture_ratio(alpha: float = ALPHA) -> float:
    """The ``x = tau^2 / V`` that makes the always-valid interval narrowest relative to the fixed one."""
    found = optimize.minimize_scalar(
        lambda lx: width_ratio(math.exp(lx), alpha), bounds=(-5, 10), method="bounded"
    )
    return math.exp(float(found.x))


TUNED_WIDTH_RATIO = width_ratio(best_mixture_ratio())


def variance_at_detection(min_detectable_effect: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The variance of the lift's estimate at the sample size where a fixed test detects the MDE."""
    z = float(z_value(alpha)) + float(stats.norm.ppf(power))
    return (min_detectable_effect / z) ** 2


def mixture_variance(min_detectable_effect: float, alpha: float = ALPHA) -> float:
    """tau^2: the always-valid interval is narrowest (about 1.55 x fixed) where the MDE is detected."""
    return best_mixture_ratio(alpha) * variance_at_detection(min_detectable_effect, alpha)


@dataclass(frozen=True, slots=True)
class Lift:
    """Treatment minus control, with both intervals (95 %) and the always-valid p-value."""

    absolute: float
    relative: float  # NaN when control's mean is 0
    ci_low: float
    ci_high: float
    fixed_ci_low: float
    fixed_ci_high: float
    p_value: float


@dataclass(frozen=True, slots=True)
class Lifts:
    """The same as ``Lift`` for many experiments at once (numpy arrays)."""

    absolute: Array
    relative: Array
    ci_low: Array
    ci_high: Array
    fixed_ci_low: Array
    fixed_ci_high: Array
    p_value: Array

    def one(self, index: int | tuple[int, ...] = ()) -> Lift:
        def at(a: Array) -> float:
            return float(np.asarray(a)[index])

        return Lift(
            at(self.absolute),
            at(self.relative),
            at(self.ci_low),
            at(self.ci_high),
            at(self.fixed_ci_low),
            at(self.fixed_ci_high),
            at(self.p_value),
        )


def lifts(treatment: Moments, control: Moments, tau2: Any, alpha: Any = ALPHA) -> Lifts:
    estimate, variance, control_mean = difference(treatment, control)
    # No variation in either arm (no conversion yet, or no revenue) is no
    # information, not certainty: the plug-in variance 0 would give the
    # interval [est, est] and call the experiment ready. No interval instead.
    variance = np.where(variance > 0, variance, np.nan)
    low, high = always_valid_interval(estimate, variance, tau2, alpha)
    fixed_low, fixed_high = fixed_interval(estimate, variance, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(control_mean != 0, estimate / control_mean, np.nan)
    return Lifts(
        estimate, relative, low, high, fixed_low, fixed_high, always_valid_p_value(estimate, variance, tau2)
    )


def lift(treatment: Moments, control: Moments, tau2: float, alpha: float = ALPHA) -> Lift:
    return lifts(treatment, control, tau2, alpha).one()


def revenue_mixture_variance(
    min_detectable_effect: float,
    control: Moments,
    control_conversions: int,
    treatment: Moments,
    treatment_conversions: int,
    alpha: float = ALPHA,
) -> float:
    """tau^2 for revenue per unit: the MDE in revenue is the conversion MDE times a converting unit's revenue."""
    for arm, conversions in ((control, control_conversions), (treatment, treatment_conversions)):
        if conversions > 0 and float(arm.total) > 0:
            per_conversion = float(arm.total) / conversions
            return mixture_variance(min_detectable_effect * per_conversion, alpha)
    return mixture_variance(min_detectable_effect, alpha)  # no revenue yet: any scale will do


def is_ready(lift: Lift, min_detectable_effect: float) -> bool:
    """The always-valid interval excludes zero, or is narrower than the MDE on each side of the estimate."""
    if math.isnan(lift.ci_low) or math.isnan(lift.ci_high):
        return False
    if lift.ci_low > 0 or lift.ci_high < 0:
        return True
    return (
        lift.ci_high - lift.absolute < min_detectable_effect
        and lift.absolute - lift.ci_low < min_detectable_effect
    )


@dataclass(frozen=True, slots=True)
class SegmentLift:
    name: str
    lift: Lift  # intervals corrected for the number of segments
    incremental: bool  # selected by Benjamini-Hochberg, with a positive lift
    not_incremental: bool  # the corrected interval lies below the MDE


def segment_lifts(
    segments: list[tuple[str, Moments, Moments]], min_detectable_effect: float, alpha: float = ALPHA
) -> list[SegmentLift]:
    """Each segment's conversion lift, with Benjamini-Hochberg selection and FCR-adjusted intervals."""
    if not segments:
        return []
    tau2 = mixture_variance(min_detectable_effect, alpha)
    raw = [lift(t, c, tau2, alpha) for _, t, c in segments]
    p_values = np.array([1.0 if math.isnan(r.p_value) else r.p_value for r in raw])
    adjusted = stats.false_discovery_control(p_values, method="bh")
    selected = adjusted <= alpha
    m = len(segments)
    level = max(int(selected.sum()), 1) * alpha / m
    result = []
    for (name, t, c), was_selected in zip(segments, selected, strict=True):
        corrected = lift(t, c, tau2, level)
        incremental = bool(was_selected) and corrected.absolute > 0
        result.append(
            SegmentLift(
                name=name,
                lift=corrected,
                incremental=incremental,
                # A proven lift below the MDE is still incremental: never in both lists.
                not_incremental=not incremental and corrected.ci_high < min_detectable_effect,
            )
        )
    return result
