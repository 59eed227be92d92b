"""All SQL about experiments: the experiments, their units, the arm of each click, the result aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.attribution.common.database import Connection, Executor
from services.attribution.common.models import Click, ExperimentArm
from services.attribution.experiments.rules import Experiment
from services.common.errors import AlreadyExists, NotFound

_COLUMNS = (
    "id, campaign_id, coupon_code, name, holdout_percent, starts_at, ends_at, "
    "min_detectable_effect, margin_percent, created_at, stopped_at"
)


def _experiment(row: asyncpg.Record) -> Experiment:
    return Experiment(**dict(row))


async def insert_experiment(pool: asyncpg.Pool, experiment: Experiment, now: datetime) -> Experiment:
    """Stores a new experiment; ALREADY_EXISTS when the code has an open one (the partial unique index)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM campaigns WHERE id = $1", experiment.campaign_id):
            raise NotFound(f"campaign {experiment.campaign_id!r} not found")
        # A mistyped code would hold back nobody: no click would ever carry it.
        if not await conn.fetchval(
            "SELECT 1 FROM coupons WHERE campaign_id = $1 AND code = $2",
            experiment.campaign_id,
            experiment.coupon_code,
        ):
            raise NotFound(f"code {experiment.coupon_code} not found in campaign {experiment.campaign_id!r}")
        # An experiment that ended by its own ends_at does not block the code:
        # close it (at its end) so the index sees it as such.
        await conn.execute(
            """UPDATE experiments SET stopped_at = ends_at
                WHERE campaign_id = $1 AND coupon_code = $2 AND stopped_at IS NULL AND ends_at <= $3""",
            experiment.campaign_id,
            experiment.coupon_code,
            now,
        )
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO experiments ({_COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) RETURNING {_COLUMNS}""",
                experiment.id,
                experiment.campaign_id,
                experiment.coupon_code,
                experiment.name,
                experiment.holdout_percent,
                experiment.starts_at,
                experiment.ends_at,
                experiment.min_detectable_effect,
                experiment.margin_percent,
                experiment.created_at,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"code {experiment.coupon_code} of campaign {experiment.campaign_id!r} already has a running experiment"
            ) from None
    assert row is not None  # INSERT ... RETURNING answers its row
    return _experiment(row)


async def get_experiment(conn: Executor, experiment_id: str) -> Experiment:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM experiments WHERE id = $1", experiment_id)
    if row is None:
        raise NotFound(f"experiment {experiment_id!r} not found")
    return _experiment(row)


async def list_experiments(
    conn: Executor, campaign_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Experiment]:
    """Newest first; ``after`` is the (created_at, id) of the previous page's last one."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM experiments
             WHERE ($1 = '' OR campaign_id = $1)
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4""",
        campaign_id,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [_experiment(r) for r in rows]


async def stop_experiment(conn: Executor, experiment_id: str, now: datetime) -> Experiment:
    """Stops it now (a second stop keeps the first time)."""
    row = await conn.fetchrow(
        f"""UPDATE experiments SET stopped_at = COALESCE(stopped_at, $2)
             WHERE id = $1 RETURNING {_COLUMNS}""",
        experiment_id,
        now,
    )
    if row is None:
        raise NotFound(f"experiment {experiment_id!r} not found")
    return _experiment(row)


async def open_experiments(conn: Executor, now: datetime) -> list[Experiment]:
    """Experiments not stopped and not ended: the click path's cache loads these."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM experiments
             WHERE stopped_at IS NULL AND (ends_at IS NULL OR ends_at > $1)""",
        now,
    )
    return [_experiment(r) for r in rows]


async def record_exposure(
    conn: Executor, experiment_id: str, unit_id: str, arm: ExperimentArm, at: datetime
) -> None:
    """AssignVariant's unit, once: a second call keeps the first record."""
    await conn.execute(
        """INSERT INTO experiment_units (experiment_id, unit_key, arm, source, first_seen_at)
           VALUES ($1, $2, $3, 'variant', $4) ON CONFLICT DO NOTHING""",
        experiment_id,
        unit_id,
        arm,
        at,
    )


# The clicks' arms and their units in one statement (units once: a repeat
# click finds its unit and adds only its click row).
_INSERT_CLICK_ARMS = """
WITH r AS (
    SELECT * FROM unnest($1::ascribe_click_arm_row[])
), units AS (
    INSERT INTO experiment_units
        (experiment_id, unit_key, arm, source, affiliate_id, country, device_type, first_seen_at)
    SELECT DISTINCT ON (experiment_id, unit_key)
           experiment_id, unit_key, arm, 'click', affiliate_id, country, device_type, created_at
      FROM r ORDER BY experiment_id, unit_key, created_at
    ON CONFLICT DO NOTHING
)
INSERT INTO experiment_clicks (click_id, created_at, experiment_id, unit_key, arm)
SELECT click_id, created_at, experiment_id, unit_key, arm FROM r
"""


async def insert_click_arms(conn: Connection, clicks: Sequence[Click]) -> None:
    """The arms of clicks that joined an experiment; call it in the clicks' own transaction."""
    await conn.execute(
        _INSERT_CLICK_ARMS,
        [
            (c.click_id, c.created_at, c.experiment_id, c.experiment_unit, c.experiment_arm, c.affiliate_id,
             c.country, c.device_type)
            for c in clicks
        ],
    )


async def click_arm(conn: Executor, click_id: str) -> tuple[str, ExperimentArm] | None:
    row = await conn.fetchrow("SELECT experiment_id, arm FROM experiment_clicks WHERE click_id = $1", click_id)
    return (row["experiment_id"], row["arm"]) if row is not None else None


@dataclass(frozen=True, slots=True)
class ArmAggregate:
    """One arm of one segment, as the result aggregate answers it."""

    arm: ExperimentArm
    segment: str
    units: int
    conversions: int
    conversions_sq: int  # sum over units of (conversions of the unit)^2
    revenue_micros: int
    revenue_sq: float  # sum over units of (revenue of the unit)^2, in micros^2
    discount_micros: int
    contaminated: int


_SEGMENT_EXPRESSIONS = {
    "": "''",
    "device": "COALESCE(u.device_type, 'unknown')",
    "country": "COALESCE(u.country, 'unknown')",
    "channel": "COALESCE(NULLIF(uc.channel, ''), 'unknown')",
}

# A unit's channel is the one its first click through the unit's affiliate
# was stored with (clicks.channel, migration 014), not that affiliate's
# channel now: a later UpdateAffiliate does not move the unit, as it does not
# move the click in reports. One pass over the experiment's clicks, not a
# probe per unit (experiment_clicks is indexed by experiment only); unique per
# (unit, affiliate), so the join adds no row. A unit without clicks
# (AssignVariant) or whose affiliate was unknown has none: 'unknown'.
_UNIT_CHANNELS = """, uc AS (
    SELECT DISTINCT ON (ec.unit_key, k.affiliate_id) ec.unit_key, k.affiliate_id, k.channel
      FROM experiment_clicks ec
      JOIN clicks k ON k.click_id = ec.click_id AND k.created_at = ec.created_at
     WHERE ec.experiment_id = $1
     ORDER BY ec.unit_key, k.affiliate_id, ec.created_at, ec.click_id
)"""

# Every conversion of the experiment's campaign that reaches a counting unit
# (one first seen before the end) within the window, whatever its status:
# through its click (experiment_clicks, then conversions' click index) or,
# when its click joined no arm of this experiment, through its customer id
# equal to a unit key (experiment_units, then conversions_customer). Starting
# from the experiment's own rows reads none of the campaign's other
# conversions. {experiment} is the experiment id's parameter; reports use it too
# (joining each conversion_id to its report facts).
# The OFFSET 0 fences keep each lateral probe a lookup by index per click or
# unit: flattened into a join, the planner may instead walk the conversions
# of the window (conversions_occurred) and look each one up in the arm tables.
ARM_CONVERSIONS = """
SELECT c.id AS conversion_id, u.unit_key, u.arm, c.status, c.revenue, c.discount, c.coupon_code
  FROM experiments e
  JOIN experiment_clicks ec ON ec.experiment_id = e.id
  JOIN experiment_units u ON u.experiment_id = e.id AND u.unit_key = ec.unit_key
 CROSS JOIN LATERAL (SELECT v.id, v.occurred_at, v.click_id, v.status, v.amount_micros - v.refunded_micros AS revenue,
                            v.discount_micros AS discount, v.coupon_code
                       FROM conversions v
                      WHERE v.click_id = ec.click_id AND v.campaign_id = e.campaign_id OFFSET 0) c
 WHERE e.id = {experiment}
   AND c.occurred_at >= e.starts_at
   AND c.occurred_at < LEAST(COALESCE(e.ends_at, 'infinity'), COALESCE(e.stopped_at, 'infinity'))
   AND u.first_seen_at < LEAST(COALESCE(e.ends_at, 'infinity'), COALESCE(e.stopped_at, 'infinity'))
UNION ALL
SELECT c.id, u.unit_key, u.arm, c.status, c.revenue, c.discount, c.coupon_code
  FROM experiments e
  JOIN experiment_units u ON u.experiment_id = e.id
 CROSS JOIN LATERAL (SELECT v.id, v.occurred_at, v.click_id, v.status, v.amount_micros - v.refunded_micros AS revenue,
                            v.discount_micros AS discount, v.coupon_code
                       FROM conversions v
                      WHERE v.campaign_id = e.campaign_id AND v.customer_id = u.unit_key OFFSET 0) c
 WHERE e.id = {experiment}
   AND c.occurred_at >= e.starts_at
   AND c.occurred_at < LEAST(COALESCE(e.ends_at, 'infinity'), COALESCE(e.stopped_at, 'infinity'))
   AND u.first_seen_at < LEAST(COALESCE(e.ends_at, 'infinity'), COALESCE(e.stopped_at, 'infinity'))
   AND NOT EXISTS (SELECT 1 FROM experiment_clicks k WHERE k.click_id = c.click_id AND k.experiment_id = e.id)
"""

# Units come from the units table, live conversions from ARM_CONVERSIONS.
# Per unit first, then per arm and segment, so the moments of per-unit
# values (for the variances) come out of the same one statement.
_RESULT = """
WITH e AS (
    SELECT coupon_code, LEAST(COALESCE(ends_at, 'infinity'), COALESCE(stopped_at, 'infinity')) AS ends
      FROM experiments WHERE id = $1
), conv AS MATERIALIZED (  -- once, not once per unit
    SELECT x.unit_key, x.revenue, x.discount, (x.coupon_code IS NOT DISTINCT FROM e.coupon_code) AS with_code
      FROM e, ({arm_conversions}) x
     WHERE x.status IN ('pending', 'approved', 'flagged')
){unit_channels}, per_unit AS (
    SELECT u.arm, {segment} AS segment, u.unit_key,
           count(cv.unit_key) AS conversions,
           COALESCE(sum(cv.revenue), 0) AS revenue,
           COALESCE(sum(cv.discount), 0) AS discount,
           count(*) FILTER (WHERE cv.with_code) AS contaminated
      FROM e
      JOIN experiment_units u ON u.experiment_id = $1
      {segment_join}
      LEFT JOIN conv cv ON cv.unit_key = u.unit_key
     -- A replica whose cache has not yet seen the stop may still assign a
     -- click for up to its TTL: such late units do not count either.
     WHERE u.first_seen_at < e.ends
     GROUP BY u.arm, segment, u.unit_key
)
SELECT arm, segment, count(*) AS units,
       sum(conversions)::bigint AS conversions,
       sum(conversions * conversions)::bigint AS conversions_sq,
       sum(revenue)::bigint AS revenue_micros,
       sum(revenue::float8 * revenue::float8) AS revenue_sq,
       sum(discount)::bigint AS discount_micros,
       sum(contaminated)::bigint AS contaminated
  FROM per_unit GROUP BY arm, segment ORDER BY segment, arm
"""


def result_statement(segment_by: str) -> str:
    """The result aggregate's SQL ($1: the experiment id); a test EXPLAINs it."""
    channel = segment_by == "channel"
    return _RESULT.format(
        segment=_SEGMENT_EXPRESSIONS[segment_by],
        arm_conversions=ARM_CONVERSIONS.format(experiment="$1"),
        unit_channels=_UNIT_CHANNELS if channel else "",
        segment_join="LEFT JOIN uc ON uc.unit_key = u.unit_key AND uc.affiliate_id = u.affiliate_id" if channel else "",
    )


async def result_aggregates(conn: Executor, experiment_id: str, segment_by: str) -> list[ArmAggregate]:
    """One row per arm and segment (``segment_by`` '' : one segment, '')."""
    rows = await conn.fetch(result_statement(segment_by), experiment_id)
    return [ArmAggregate(**dict(r)) for r in rows]


async def campaign_currency(conn: Executor, campaign_id: str) -> str:
    return str(await conn.fetchval("SELECT currency FROM campaigns WHERE id = $1", campaign_id) or "")
