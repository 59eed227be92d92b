"""SQL of reports: sums from the rollups (migration 009) and raw events, compaction, pace.

A report sums the rollup rows of the whole 15-minute buckets inside its range
and completes the partial buckets at its two edges from the raw events
(``report_click_facts`` and ``report_conversion_facts``, the same expressions
the triggers use). Whole UTC days of codes by country come from blocks of
days (migration 021) and the fine rows the blocks do not hold yet. The
drift check sums the same range both ways.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import asyncpg

from services.attribution.common.database import Connection
from services.attribution.experiments.store import ARM_CONVERSIONS
from services.attribution.reports.rules import (
    DAY,
    DRIFT_GROUPS,
    TOTAL_FIELDS,
    Drift,
    ReportQuery,
    Totals,
    aligned_span,
    day_blocks,
)
from services.attribution.reports.rules import drift as rules_drift

Source = Literal["report", "raw"]

# hashtextextended('ascribe_report_compact', 0): one fold at a time across replicas.
_COMPACT_LOCK = "ascribe_report_compact"
COMPACT_ALL = (
    "SELECT ascribe_report_compact() + ascribe_report_compact_campaign() + ascribe_report_compact_coupon_day()"
    " + ascribe_report_compact_account()"
)

_DIMENSIONS = ("campaign_id", "currency", "coupon", "affiliate_id", "channel", "sub1", "country", "device")
_CLICK_METRICS = ("clicks", "unique_clicks", "tracked_clicks", "rejected_clicks")
_FILTERS = {
    "campaign_id": "campaign_id",
    "affiliate_id": "affiliate_id",
    "coupon_code": "coupon",
    "country": "country",
    "device": "device",
    "sub1": "sub1",
}
# {zone} stands for the request's time zone parameter. The start of a local hour is the instant
# minus the minutes past it in local time: exact across DST changes and for
# zones whose offset is not whole hours.
_KEYS = {
    "campaign": "campaign_id",
    "coupon": "coupon",
    "affiliate": "affiliate_id",
    "channel": "channel",
    "sub1": "sub1",
    "country": "country",
    "device": "device",
    "day": "to_char(timezone({zone}::text, t), 'YYYY-MM-DD')",
    "hour": "t - (timezone({zone}::text, t) - date_trunc('hour', timezone({zone}::text, t)))",
    "arm": "coalesce(arm, '')",
}


@dataclass(frozen=True)
class SummedRow:
    keys: dict[str, object]  # group word -> value (the hour's start as an instant)
    currency: str
    totals: Totals


# Rollup tiers, coarsest first, with the dimensions each keeps: a report
# reads the first that keeps every dimension it groups or filters by.
_TIERS = (
    ("report_rollup_account", ("currency",)),  # migration 013
    ("report_rollup_campaign", ("campaign_id", "currency")),
    ("report_rollup", _DIMENSIONS),
)
# Daily tiers (UTC days) serve the whole days inside a report that groups by
# no time at all (a day of another zone is no UTC day), and the days of its
# edges longer than half a day; the 15-minute tiers the rest.
_DAILY_TIERS = (("report_rollup_coupon_day", ("campaign_id", "currency", "coupon")),)
# Blocks of whole UTC days (migration 021) serve what no daily tier does
# among reports that group by no time, with the fine rows written since the
# blocks' last pass (at or above their watermark).
_BLOCKS = "report_block_coupon_country"
_BLOCK_DIMENSIONS = ("campaign_id", "currency", "coupon", "country")
_BYTE_ORDER = ' COLLATE "C"'
_GROUP_COLUMNS = {g: c for g, c in _KEYS.items() if g not in ("day", "hour", "arm")}


def _whole_days(lo: datetime, hi: datetime) -> tuple[datetime, datetime] | None:
    first = lo.replace(hour=0, minute=0, second=0, microsecond=0)
    if first < lo:
        if first.date() == first.date().max:
            return None  # no day after 9999-12-31 (adding one raised OverflowError: INTERNAL)
        first += DAY
    last = hi.replace(hour=0, minute=0, second=0, microsecond=0)
    return (first, last) if first < last else None


def _timed(query: ReportQuery) -> bool:
    return bool({"day", "hour"} & set(query.groups))


def _needed(query: ReportQuery) -> set[str]:
    """The rollup columns a query groups or filters by."""
    groups = {_GROUP_COLUMNS[g] for g in query.groups if g in _GROUP_COLUMNS}
    return {"currency"} | groups | {column for field, column in _FILTERS.items() if getattr(query, field)}


def _blocks_may_serve(query: ReportQuery) -> bool:
    needed = _needed(query)
    return (
        not query.experiment_id
        and not _timed(query)
        and needed <= set(_BLOCK_DIMENSIONS)
        and not any(needed <= set(kept) for _, kept in _DAILY_TIERS)
    )


async def _block_watermark(conn: Connection | asyncpg.Pool, query: ReportQuery, source: Source) -> str | None:
    """The blocks' watermark (text) when they may serve ``query``; None when not, or not usable.

    Not usable: never built (the first pass's walk, migration 022, has not
    ended), or ahead of this snapshot's xmin, which only a restore into
    another cluster makes (the next pass rebuilds the blocks). The statement
    reads the watermark again in its own snapshot: a pass that commits in
    between only raises it (its rows then count in the blocks).
    """
    span = aligned_span(query.start, query.end)
    if source != "report" or not _blocks_may_serve(query) or span is None or _whole_days(*span) is None:
        return None
    return await _usable_block_watermark(conn)


async def _usable_block_watermark(conn: Connection | asyncpg.Pool) -> str | None:
    """The blocks' watermark (text) unless never built or ahead of this snapshot's xmin (``_block_watermark``)."""
    found: str | None = await conn.fetchval(
        "SELECT watermark::text FROM report_block_watermarks"
        " WHERE tier = $1 AND watermark <= pg_snapshot_xmin(pg_current_snapshot())",
        _BLOCKS,
    )
    return found


def _statement(query: ReportQuery, source: Source, block_watermark: str | None = None) -> tuple[str, list[object]]:
    args: list[object] = []

    def param(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    span = aligned_span(query.start, query.end) if source == "report" else None
    timed = _timed(query)
    zone = param(query.time_zone) if timed else ""
    needed = _needed(query)
    filters = {column: getattr(query, field) for field, column in _FILTERS.items() if getattr(query, field)}
    where = "".join(f" AND {column} = {param(value)}" for column, value in filters.items())
    columns = [c for c in _DIMENSIONS if c in needed]
    conversion_metrics = [m for m in TOTAL_FIELDS if m not in _CLICK_METRICS]
    parts = []

    def rollup(table: str, a: datetime, b: datetime, *, less: bool = False) -> None:
        """The rows of [a, b) in ``table``; with ``less``, their sums negated (taken away)."""
        within = f" WHERE bucket >= {param(a)} AND bucket < {param(b)}{where}"
        if less:
            negated = [*columns, *(f"-{m} AS {m}" for m in TOTAL_FIELDS)]
            parts.append(f"SELECT {', '.join(negated)} FROM {table}{within}")
        elif timed:
            # Summed per bucket and key first: the outer query then computes
            # the zone's keys on few rows.
            inner = ["bucket AS t", *columns, *(f"ascribe_report_sum({m}) AS {m}" for m in TOTAL_FIELDS)]
            group = ", ".join(["bucket", *columns])
            parts.append(f"SELECT {', '.join(inner)} FROM {table}{within} GROUP BY {group}")
        else:
            # One aggregation over the rollup rows themselves: summing them per
            # key here and again outside sorted and hashed every row twice
            # (measured on the bench's one affiliate by sub1 and country:
            # 140 -> 45 ms of SQL; the export by coupon and country 4.4 -> 3.1 s).
            parts.append(f"SELECT {', '.join([*columns, *TOTAL_FIELDS])} FROM {table}{within}")

    def blocks(first: datetime, last: datetime, watermark: str) -> None:
        selected = ", ".join([*columns, *TOTAL_FIELDS])
        for days, start in day_blocks(first, last):
            parts.append(
                f"SELECT {selected} FROM {_BLOCKS} WHERE days = {param(days)} AND bucket = {param(start)}{where}"
            )
        # The fine rows the blocks do not hold yet, found by their index on
        # xid: the first bound is a constant the planner can weigh, the second
        # the watermark in this statement's snapshot (the one its blocks are of).
        parts.append(
            f"SELECT {selected} FROM report_rollup WHERE xid >= {param(watermark)}::text::xid8"
            f" AND xid >= (SELECT watermark FROM report_block_watermarks WHERE tier = '{_BLOCKS}')"
            f" AND bucket >= {param(first)} AND bucket < {param(last)}{where}"
        )

    if query.experiment_id:
        # An experiment's events are a small set: read them raw, joined to
        # their arms (no rollup keeps arms). Clicks with an arm of this
        # experiment inside its window; conversions as GetExperimentResult
        # reaches them (every status here: the report shows them all).
        experiment = param(query.experiment_id)
        within = f"at >= {param(query.start)} AND at < {param(query.end)}{where}"
        selected = [*(['at AS t'] if timed else []), *columns, "arm"]
        parts.append(
            f"SELECT {', '.join([*selected, *_CLICK_METRICS, *(f'0 AS {m}' for m in conversion_metrics)])}"
            f" FROM (SELECT f.*, ec.arm FROM experiments x"
            f" JOIN experiment_clicks ec ON ec.experiment_id = x.id"
            f" JOIN report_click_facts f ON f.click_id = ec.click_id"
            f" WHERE x.id = {experiment} AND f.at >= x.starts_at"
            f" AND f.at < LEAST(COALESCE(x.ends_at, 'infinity'), COALESCE(x.stopped_at, 'infinity'))) k"
            f" WHERE {within}"
        )
        parts.append(
            f"SELECT {', '.join([*selected, *(f'0 AS {m}' for m in _CLICK_METRICS), *conversion_metrics])}"
            f" FROM (SELECT f.*, a.arm FROM ({ARM_CONVERSIONS.format(experiment=experiment)}) a"
            # a probe by primary key per conversion (the fence keeps it one)
            f" CROSS JOIN LATERAL (SELECT * FROM report_conversion_facts r"
            f" WHERE r.conversion_id = a.conversion_id OFFSET 0) f) v"
            f" WHERE {within}"
        )
        edges = []
    elif span is None:
        edges = [(query.start, query.end)]  # no whole bucket: every event from the raw tables
    else:
        lo, hi = span
        table = next(name for name, kept in _TIERS if needed <= set(kept))
        daily = next((name for name, kept in _DAILY_TIERS if needed <= set(kept)), None)
        days = _whole_days(lo, hi) if not timed else None
        if days and (daily or block_watermark is not None):
            first, last = days
            # An edge of more than half a day reads as its day's row (or
            # block) less the fine rows of the rest of that day: fewer rows
            # (at 10M clicks a day is about 370,000 fine rows, 18,500 of one
            # campaign; a day block holds at most one row per campaign, code
            # and country, about 120,000 there, the daily tier one per code).
            since = first - DAY if first - lo > DAY / 2 else first
            until = last + DAY if hi - last > DAY / 2 and last.date() < last.date().max else last
            if daily:
                rollup(daily, since, until)
            elif block_watermark is not None:
                blocks(since, until, block_watermark)
            for a, b in ((lo, first), (last, hi)):
                if a < b and not (since <= a and b <= until):
                    rollup(table, a, b)
            for a, b in ((since, lo), (hi, until)):
                if a < b:
                    rollup(table, a, b, less=True)
        else:
            rollup(table, lo, hi)
        edges = [(a, b) for a, b in ((query.start, lo), (hi, query.end)) if a < b]
    for a, b in edges:
        within = f"at >= {param(a)} AND at < {param(b)}{where}"
        selected = [*(['at AS t'] if timed else []), *columns]
        parts.append(
            f"SELECT {', '.join([*selected, *_CLICK_METRICS, *(f'0 AS {m}' for m in conversion_metrics)])}"
            f" FROM report_click_facts WHERE {within}"
        )
        parts.append(
            f"SELECT {', '.join([*selected, *(f'0 AS {m}' for m in _CLICK_METRICS), *conversion_metrics])}"
            f" FROM report_conversion_facts WHERE {within}"
        )
    # Text keys sort byte by byte (COLLATE "C"): the same order on every
    # server, and a cheaper sort than the database's default collation, which
    # compares through the C library's locale rules (one affiliate by sub1 and
    # country at 10M clicks, 55,054 rows: its sort 70 -> 46 ms of 262).
    keys = [f"{_KEYS[g].format(zone=zone)}{'' if g == 'hour' else _BYTE_ORDER} AS k_{g}" for g in query.groups]
    group = ", ".join([*(f"k_{g}" for g in query.groups), "k_currency"])
    # ascribe_report_sum (migration 015): sum() of bigints answers numeric.
    sums = ", ".join(f"ascribe_report_sum({m}) AS {m}" for m in TOTAL_FIELDS)
    # Every event in a key counts one click or one order, so a key of none
    # has no event in the range: only sums taken away (a day's block or daily
    # row less the rest of its day) or an order moved to another key left it.
    sql = (
        f"SELECT {', '.join([*keys, f'currency{_BYTE_ORDER} AS k_currency'])}, {sums}"
        f" FROM ({' UNION ALL '.join(parts)}) e GROUP BY {group}"
        " HAVING ascribe_report_sum(clicks) <> 0 OR ascribe_report_sum(conversions) <> 0"
        f" ORDER BY {group}"
    )
    return sql, args


def _summed(query: ReportQuery, record: asyncpg.Record) -> SummedRow:
    return SummedRow(
        keys={g: record[f"k_{g}"] for g in query.groups},
        currency=record["k_currency"],
        totals=Totals(**{m: int(record[m]) for m in TOTAL_FIELDS}),
    )


async def sums(conn: Connection | asyncpg.Pool, query: ReportQuery, source: Source = "report") -> list[SummedRow]:
    """The report's rows: one per group key and currency, in key order.

    ``raw`` recomputes from the events alone (the drift check compares it
    with the report).
    """
    sql, args = _statement(query, source, await _block_watermark(conn, query, source))
    return [_summed(query, r) for r in await conn.fetch(sql, *args)]


async def records(conn: Connection | asyncpg.Pool, query: ReportQuery) -> list[asyncpg.Record]:
    """The report's rows as the database answers them: ``k_<group>`` keys, ``k_currency``, TOTAL_FIELDS."""
    sql, args = _statement(query, "report", await _block_watermark(conn, query, "report"))
    return list(await conn.fetch(sql, *args))


async def stream_records(
    conn: Connection, query: ReportQuery, chunk: int, timeout: float
) -> AsyncIterator[list[asyncpg.Record]]:
    """``records`` in lists of ``chunk`` through a cursor (inside the caller's transaction)."""
    sql, args = _statement(query, "report", await _block_watermark(conn, query, "report"))
    cursor = await conn.cursor(sql, *args, timeout=timeout)
    while found := await cursor.fetch(chunk, timeout=timeout):
        yield found


async def settle(conn: Connection, *, work_mem: str, timeout_ms: int | None = None) -> None:
    """The settings of a report's transaction, in one round trip (``SET LOCAL``: they end with it).

    JIT is off: the planner compiles a report's expressions once its cost
    passes jit_above_cost, and a report is sums over rows read from memory,
    which compiled code does not speed up. Measured on one affiliate by sub1
    and country (10M clicks, forced on): 300 ms without, 650 ms with JIT and
    4.8 s with its optimisation, which the planner turns on above a cost of
    500,000 (the export by coupon and country costs 4M: 2.9 s of compiling).

    Plans are made for the values at hand (a prepared statement's generic
    plan would weigh "xid >= $n", the fine rows beside the day blocks, as a
    third of the table, not the last seconds of it).
    """
    settings = [
        f"SET LOCAL work_mem = '{work_mem}'", "SET LOCAL jit = off", "SET LOCAL plan_cache_mode = force_custom_plan"
    ]
    if timeout_ms is not None:
        settings.append(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
    await conn.execute("; ".join(settings))


# A pass normally takes the last interval's rows (about a second for 18,000
# at the bench's write rate), but while the blocks are first built it takes a
# chunk of a million existing rows (migration 022; about 90 s on 2 cores),
# with whatever the other tiers' folds have to catch up: the pool's statement
# timeout, meant for short reads, would cut it off forever.
COMPACT_TIMEOUT_S = 3600.0


async def compact(pool: asyncpg.Pool) -> int | None:
    """Folds the rollups' fresh deltas and fills the day blocks; None when another replica is folding.

    While the blocks are first built, each call takes the next chunk of the
    existing rows (``blocks_built`` says when the last is in).
    """
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", _COMPACT_LOCK):
            return None
        await conn.execute(f"SET LOCAL statement_timeout = {int(COMPACT_TIMEOUT_S * 1000)}")
        folded = await conn.fetchval(COMPACT_ALL, timeout=COMPACT_TIMEOUT_S)
        return int(folded)


async def blocks_built(conn: Connection | asyncpg.Pool) -> bool:
    """Whether reports read the day blocks: their walk is over and the watermark not ahead."""
    return await _usable_block_watermark(conn) is not None


@dataclass(frozen=True)
class CodeUsage:
    usage_limit: int
    used: int
    valid_until: datetime | None
    uses_last_24h: int


async def code_usage(
    conn: Connection | asyncpg.Pool, codes: Sequence[tuple[str, str]], now: datetime
) -> dict[tuple[str, str], CodeUsage]:
    """Limited codes among ``(campaign_id, code)`` with their live uses taken in the last 24 hours."""
    if not codes:
        return {}
    rows = await conn.fetch(
        """SELECT c.campaign_id, c.code, c.usage_limit, c.used, c.valid_until,
                  (SELECT count(*) FROM redemptions r
                    WHERE r.campaign_id = c.campaign_id AND r.code = c.code
                      AND r.released_at IS NULL AND r.taken_at >= $3) AS recent
             FROM coupons c
             JOIN unnest($1::text[], $2::text[]) AS k(campaign_id, code) USING (campaign_id, code)
            WHERE c.usage_limit > 0""",
        [c[0] for c in codes], [c[1] for c in codes], now - timedelta(hours=24),
    )
    return {
        (r["campaign_id"], r["code"]): CodeUsage(r["usage_limit"], r["used"], r["valid_until"], r["recent"])
        for r in rows
    }


async def drift(conn: Connection | asyncpg.Pool, start: datetime, end: datetime) -> list[Drift]:
    """Recomputes [start, end) from the raw events and compares it with the report's sums.

    The report side is what GetReport reads (rollups inside, raw events at
    the edges), once through each tier; the raw side scans every event of
    the range.
    """
    found: list[Drift] = []
    # the fine tier, the campaign tier, the daily coupon tier and the day blocks (whole UTC days inside
    # the range), the account tier
    for groups in (DRIFT_GROUPS, ("campaign", "hour"), ("campaign", "coupon"), ("coupon", "country"), ("hour",)):
        query = ReportQuery(start=start, end=end, groups=groups)
        reported = await sums(conn, query, "report")
        recomputed = await sums(conn, query, "raw")
        found += rules_drift(
            [(r.keys, r.currency, r.totals) for r in reported],
            [(r.keys, r.currency, r.totals) for r in recomputed],
        )
    return found
