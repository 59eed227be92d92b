"""ReportService: what every code, affiliate, channel and country earns.

Proto <-> domain translation only: the rules are in ``reports.rules``, the SQL
in ``reports.store``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.attribution.catalog.convert import from_timestamp
from services.attribution.experiments import store as experiments_store
from services.attribution.reports import rules, store
from services.common import limits
from services.common.enum_words import EnumWords
from services.common.errors import InvalidArgument, Violations
from services.common.timestamps import in_range, set_timestamp, utcnow

_GROUPS = EnumWords(pb.ReportGroupBy, "REPORT_GROUP_BY_")
_DEVICES = EnumWords(pb.DeviceType, "DEVICE_TYPE_")
# About 150 bytes a row: a chunk stays far below gRPC's 4 MiB message limit.
EXPORT_CHUNK_ROWS = 5000
EXPORT_MAX_SECONDS = 600.0  # the CLI's export deadline
EXPORT_WORK_MEM = "64MB"
REPORT_WORK_MEM = "32MB"


def report_query(request: pb.GetReportRequest) -> rules.ReportQuery:
    """The request as a query, or INVALID_ARGUMENT naming each bad field."""
    v = Violations()
    for field, limit in (
        ("campaign_id", limits.CAMPAIGN_ID),
        ("affiliate_id", limits.AFFILIATE_ID),
        ("coupon_code", limits.COUPON_CODE),
        ("sub1", limits.SUB_ID),
        ("time_zone", limits.TIME_ZONE),
        ("experiment_id", limits.EXPERIMENT_ID),
    ):
        if len(getattr(request, field).encode()) > limit:
            v.add(field, f"must be at most {limit} bytes")
        elif "\x00" in getattr(request, field):
            # PostgreSQL text cannot hold NUL: as a filter it failed the query (INTERNAL).
            v.add(field, "must not contain NUL characters")
    if request.device_type and request.device_type not in _DEVICES.words:
        v.add("device_type", "unknown device type")
    start = _time(v, "from", getattr(request, "from")) if request.HasField("from") else None
    end = _time(v, "to", request.to) if request.HasField("to") else None
    v.raise_if_any()
    return rules.report_query(
        start=start,
        end=end,
        groups=[_GROUPS.words.get(g) for g in request.group_by],
        time_zone=request.time_zone.strip(),
        campaign_id=request.campaign_id.strip(),
        affiliate_id=request.affiliate_id.strip(),
        coupon_code=request.coupon_code,
        country=request.country.strip(),
        device=_DEVICES.words.get(request.device_type, ""),
        sub1=request.sub1,
        experiment_id=request.experiment_id.strip(),
    )


def _time(v: Violations, field: str, stamp: Timestamp) -> datetime | None:
    if not in_range(stamp.seconds, stamp.nanos):
        v.add(field, "is out of range")
        return None
    return from_timestamp(stamp)


def add_rows(query: rules.ReportQuery, found: Iterable[Any], rows: Any) -> None:
    """Appends ``found`` (``store.records``) to the repeated ReportRow field ``rows``.

    Rows are filled in place (``add()``, then field by field) rather than built
    and copied, with the rates of ``rules.rates`` computed inline (its
    dataclasses cost more than the rest of a row together): a report of one
    affiliate by sub1 and country answers 17,787 rows, an export 120,000.
    ``tests/unit/test_report_rules.py`` holds both ways equal.
    """
    groups = query.groups
    first = len(groups)
    zone = query.time_zone
    named = [(i, group, group == "hour") for i, group in enumerate(groups)]
    add = rows.add
    for values in found:
        row = add()
        if named:
            keys = row.keys
            for i, group, hour in named:
                value = values[i]
                if hour:
                    keys[group] = rules.hour_key(value, zone)
                else:
                    keys[group] = "" if value is None else str(value)
        (currency, clicks, unique_clicks, tracked_clicks, rejected_clicks, conversions, pending, approved,
         flagged, rejected, reversed_, revenue, discount, payout, refunded, uses_taken) = values[first:]
        m = row.metrics
        m.currency = currency
        # Zeros stay unset (the same message: proto3 sends no zero), and most
        # are zero: a key of clicks without orders, or orders without clicks.
        if clicks:
            m.clicks = clicks
        if unique_clicks:
            m.unique_clicks = unique_clicks
        if tracked_clicks:
            m.tracked_clicks = tracked_clicks
        if rejected_clicks:
            m.rejected_clicks = rejected_clicks
        if conversions:
            m.conversions = conversions
        if pending:
            m.pending = pending
        if approved:
            m.approved = approved
        if flagged:
            m.flagged = flagged
        if rejected:
            m.rejected = rejected
        if reversed_:
            m.reversed = reversed_
        if revenue:
            m.revenue_micros = revenue
        if discount:
            m.discount_micros = discount
        if payout:
            m.payout_micros = payout
        if refunded:
            m.refunded_micros = refunded
        if uses_taken:
            m.uses_taken = uses_taken
        # rules.rates, inline (0 where the denominator is 0: unset)
        if clicks:
            m.conversion_rate = conversions / clicks
            m.epc_micros = payout / clicks
        live = pending + approved
        if live:
            m.aov_micros = revenue / live
        spent = discount + payout
        if spent:
            m.roas = revenue / spent
        if conversions:
            m.fraud_rate = (flagged + rejected) / conversions
            m.reversal_rate = reversed_ / conversions


def _zone_unknown_to_postgresql() -> InvalidArgument:
    """PostgreSQL's zone database is not Python's (the embedded server has no posix/ or right/
    zones): a name only Python knows fails the query; it is the caller's bad time_zone."""
    return InvalidArgument.one("time_zone", "unknown to the database's time zones; an IANA name such as Europe/Berlin")


class ReportServicer(attribution_pb2_grpc.ReportServiceServicer):
    def __init__(self, pool: asyncpg.Pool, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._pool = pool
        self._clock = clock

    async def GetReport(
        self, request: pb.GetReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetReportResponse:
        query = await self._query(request)
        answer = pb.GetReportResponse()
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                # The planner cannot guess how many keys a report has: with the
                # default 4 MB its one aggregation spilled to disk (the bench's
                # one affiliate by sub1 and country: 17,787 keys, 5 batches).
                await store.settle(conn, work_mem=REPORT_WORK_MEM)
                found = await store.records(conn, query)
        except asyncpg.InvalidParameterValueError:
            raise _zone_unknown_to_postgresql() from None
        add_rows(query, found, answer.rows)
        await self._add_pace(query, answer.rows)
        return answer

    async def ExportReport(
        self, request: pb.ExportReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ExportReportResponse]:
        query = await self._query(pb.GetReportRequest.FromString(request.SerializeToString()))
        # An export sums the whole of its range before its first row: it gets
        # the caller's deadline (capped), not the pool's statement timeout
        # meant for short reads.
        remaining = context.time_remaining()
        seconds = min(remaining if remaining is not None else EXPORT_MAX_SECONDS, EXPORT_MAX_SECONDS)
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                # Its aggregation over ~1M rollup rows spills to disk with the
                # default 4 MB (the bench's 120,066 keys of coupon by country
                # hold 37 MB of sums; a hash may take work_mem times
                # hash_mem_multiplier, 2 by default).
                await store.settle(conn, work_mem=EXPORT_WORK_MEM, timeout_ms=max(int(seconds * 1000), 1))
                async for found in store.stream_records(conn, query, EXPORT_CHUNK_ROWS, timeout=seconds):
                    chunk = pb.ExportReportResponse()
                    add_rows(query, found, chunk.rows)
                    await self._add_pace(query, chunk.rows)
                    yield chunk
        except asyncpg.InvalidParameterValueError:
            raise _zone_unknown_to_postgresql() from None

    async def _query(self, request: pb.GetReportRequest) -> rules.ReportQuery:
        query = report_query(request)
        if query.experiment_id:  # NOT_FOUND rather than an empty report for a mistyped id
            await experiments_store.get_experiment(self._pool, query.experiment_id)
        return query

    async def _add_pace(self, query: rules.ReportQuery, rows: Sequence[pb.ReportRow]) -> None:
        """Pace and forecast on the rows of limited codes (a COUPON grouping that names the campaign)."""
        if "coupon" not in query.groups or ("campaign" not in query.groups and not query.campaign_id):
            # A code is a campaign's: without one no row can have a pace (and
            # an export by coupon and country would walk 120,000 rows for none).
            return
        codes: dict[tuple[str, str], list[int]] = {}
        for i, row in enumerate(rows):
            campaign = row.keys.get("campaign") or query.campaign_id
            code = row.keys["coupon"]
            if campaign and code:
                codes.setdefault((campaign, code), []).append(i)
        if not codes:
            return
        now = self._clock()
        usage = await store.code_usage(self._pool, list(codes), now)
        for key, found in usage.items():
            p = rules.pace(max(found.usage_limit - found.used, 0), found.uses_last_24h, now, found.valid_until)
            for i in codes[key]:
                pace = rows[i].pace
                pace.SetInParent()
                pace.remaining = p.remaining
                pace.uses_per_day = p.uses_per_day
                pace.exhausted_before_valid_until = p.exhausted_before_valid_until
                if p.exhausted_at_forecast is not None:
                    set_timestamp(pace.exhausted_at_forecast, p.exhausted_at_forecast)
