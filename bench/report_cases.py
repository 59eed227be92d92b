"""Cases r (reports): what rollups cost the click and conversion paths, and how fast reports answer.

- r.*_rollups_off / r.*_rollups_on: the same load with the rollup triggers
  disabled, then enabled, in the same run (ratio on/off; the issue allows
  at most 15 % less throughput);
- r.report_*: GetReport p99 over 50 runs on the seeded data set (see
  ``report_seed``) while a steady 500 clicks/s and 100 conversions/s are
  written through the gateway; r.export: ExportReport rows/s;
- r.*_floor: the floor of the two reports with the most rows, their rows
  built, serialized and parsed in Python alone (``_floors``), beside them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from bench import report_seed
from bench.cases import AVAILABLE, FAILED, CaseResult, Goal, percentile, run_load, unavailable

if TYPE_CHECKING:
    from bench.cases import Runner

ROLLUP_COST_GOAL = Goal(">= 0.85 of rollups off", "ratio", ">=", 0.85)
CAMPAIGN_GOAL = Goal("p99 <= 150 ms", "p99_ms", "<=", 150)
ACCOUNT_GOAL = Goal("p99 <= 250 ms", "p99_ms", "<=", 250)
AFFILIATE_GOAL = Goal("p99 <= 250 ms", "p99_ms", "<=", 250)
EXPORT_GOAL = Goal(">= 100,000 rows/s", "throughput", ">=", 100_000)
RUNS = 50
_TRIGGERS = (
    ("clicks", "report_clicks"),
    ("conversions", "report_conversions_insert"),
    ("conversions", "report_conversions_update"),
)


async def _set_rollups(database_url: str, enabled: bool) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for table, trigger in _TRIGGERS:
            await conn.execute(f"ALTER TABLE {table} {'ENABLE' if enabled else 'DISABLE'} TRIGGER {trigger}")
    finally:
        await conn.close()


def rollup_cost(runner: Runner) -> None:
    reason = runner.service_missing("fraud", "attribution", "gateway") or runner.ensure_catalog()
    pairs = [("r.clicks_rollups", "clicks through the gateway, peak"),
             ("r.conversions_rollups", f"conversions through the gateway, {runner.mode.codes} codes")]
    if reason:
        for key, title in pairs:
            runner.add(unavailable(f"{key}_off", f"{title}, rollups off", reason))
            runner.add(unavailable(f"{key}_on", f"{title}, rollups on", reason, [ROLLUP_COST_GOAL]))
        return
    assert runner.env.stack is not None and runner.catalog is not None
    catalog, gateway = runner.catalog, runner.env.stack.gateway_url
    specs: dict[str, dict[str, Any]] = {
        "r.clicks_rollups": {
            "kind": "click", "target": gateway, "mode": "closed", "concurrency": runner.mode.concurrency,
            "params": {"campaign_id": catalog.campaign_id, "affiliate_id": catalog.affiliate_id},
        },
        "r.conversions_rollups": {
            "kind": "postback", "mode": "closed", "concurrency": runner.mode.concurrency, "target": gateway,
            "params": {"campaign_id": catalog.campaign_id, "token": catalog.token, "codes": catalog.codes},
        },
    }
    oks = {"r.clicks_rollups": lambda o: o == "302", "r.conversions_rollups": lambda o: o.startswith("200:")}
    for key, title in pairs:
        # Off and on alternate twice and each keeps its better run: on this
        # shared 2-core machine a single pair mostly measures the neighbours.
        results: dict[str, CaseResult] = {}
        for enabled in (False, True, False, True):
            asyncio.run(_set_rollups(runner.env.database_url, enabled))
            state = "on" if enabled else "off"
            run = runner.load_case(
                f"{key}_{state}", f"{title}, rollups {state}", specs[key], ok=oks[key],
                goals=[ROLLUP_COST_GOAL] if enabled else [],
                unit="clicks/s" if "clicks" in key else "conv/s",
            )
            earlier = results.get(state)
            if earlier is None or (run.throughput or 0) > (earlier.throughput or 0):
                results[state] = run
        for result in results.values():
            result.note += "; the better of two alternating runs"
        runner.add(results["off"])
        runner.ratio(results["on"], f"{key}_off")
        runner.add(results["on"])


def report_speed(runner: Runner) -> None:
    keys = [
        ("r.report_campaign_by_coupon", "GetReport: one campaign, 30 days, by coupon", CAMPAIGN_GOAL),
        ("r.report_account_by_day_kolkata", "GetReport: whole account, by day, Asia/Kolkata", ACCOUNT_GOAL),
        ("r.report_affiliate_by_sub1_country", "GetReport: one affiliate, by sub1 and country", AFFILIATE_GOAL),
        ("r.export", "ExportReport: by coupon and country, 30 days", EXPORT_GOAL),
    ]
    reason = runner.service_missing("fraud", "attribution", "gateway") or runner.ensure_catalog()
    if reason:
        for key, title, goal in keys:
            runner.add(unavailable(key, title, reason, [goal]))
        return
    clicks, conversions = (1_000_000, 100_000) if runner.mode.name == "quick" else (10_000_000, 1_000_000)
    asyncio.run(_set_rollups(runner.env.database_url, True))
    seeded = asyncio.run(_seed(runner.env.database_url, clicks, conversions))
    disk = ", ".join(f"{table} {size / 2**20:,.0f} MiB" for table, size in seeded.disk_bytes.items())
    seed_note = (
        f"{clicks:,} clicks and {conversions:,} conversions seeded by COPY in {seeded.seconds:.0f} s "
        f"({'generated now' if seeded.generated else 'rows from the cache'}); disk: {disk}"
    )
    assert runner.env.stack is not None and runner.catalog is not None
    catalog, gateway = runner.catalog, runner.env.stack.gateway_url
    measure_seconds = 60.0  # the 150 reports and the export take well under this
    background = [
        {"kind": "click", "target": gateway, "mode": "open", "rate": 500.0, "warmup": 0.5,
         "duration": measure_seconds,
         "params": {"campaign_id": catalog.campaign_id, "affiliate_id": catalog.affiliate_id}},
        {"kind": "postback", "target": gateway, "mode": "open", "rate": 100.0, "warmup": 0.5,
         "duration": measure_seconds,
         "params": {"campaign_id": catalog.campaign_id, "token": catalog.token, "codes": catalog.codes}},
    ]
    addr = runner.env.stack.addr("attribution")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        loads = [
            pool.submit(run_load, spec, processes=1, ok=lambda o: o == "302" or o.startswith("200:"),
                        cpu_groups={}, rss_pids={})
            for spec in background
        ]
        time.sleep(3.0)  # the load generators warm up and start writing
        results = asyncio.run(_time_reports(addr, seeded, keys))
        try:
            statements = asyncio.run(_export_statements(runner.env.database_url, seeded))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            # the reports' own figures are kept whatever became of these
            statements = [CaseResult(key, title, status=FAILED, note=str(error)[:200])
                          for key, title in _EXPORT_STATEMENTS.values()]
        for future in loads:
            try:
                future.result(timeout=measure_seconds + 120)
            except Exception as error:
                for result in results:
                    result.note += f"; background load failed: {error}"
    try:
        floors = asyncio.run(_floors(runner.env.database_url, seeded))
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        # the reports' own figures are kept whatever became of their floors
        floors = {f"{key}_floor": CaseResult(f"{key}_floor", f"floor of {key}", status=FAILED, note=str(error)[:200])
                  for key in ("r.report_affiliate_by_sub1_country", "r.export")}
    for floor in floors.values():
        runner.add(floor)
    fine, blocks = statements  # the reference first: ratio() reads it from the runner
    for statement in (fine, blocks):
        statement.note = f"{statement.note}; {seed_note}"
    runner.add(fine)
    runner.ratio(blocks, fine.key, "throughput")
    runner.add(blocks)
    for result in results:
        result.note = f"{result.note}; {seed_note}" if result.note else seed_note
        result.extra["seed_seconds"] = round(seeded.seconds, 1)
        result.extra["disk_bytes"] = seeded.disk_bytes
        if f"{result.key}_floor" in floors:
            # a report's median of 50 runs against its floor's median of five
            runner.ratio(result, f"{result.key}_floor", "p50_ms" if result.key.startswith("r.report") else "throughput")
        runner.add(result)


FLOOR_RUNS = 5
STATEMENT_RUNS = 2
_EXPORT_STATEMENTS = {
    "fine": ("r.export_sql_fine_tier",
             "the export's statement over the fine tier, as before the day blocks (reference)"),
    "blocks": ("r.export_sql_blocks", "the export's statement over the day blocks"),
}


async def _export_statements(database_url: str, seeded: report_seed.Seeded) -> list[CaseResult]:
    """The export's SQL over the day blocks and over the fine tier, alternating, right after the reports.

    Rows fetched through a cursor in the export's chunks, as the service
    fetches them, but not built into messages: what the blocks change. The
    write load runs for 60 s from the reports' start: at quick size these run
    under it, at full size after it.
    """
    from services.attribution.reports import rules, servicer, store

    query = rules.ReportQuery(start=seeded.start, end=seeded.end, groups=("coupon", "country"))
    conn = await asyncpg.connect(database_url, timeout=10, command_timeout=600)
    best: dict[str, float] = {}
    rows: dict[str, int] = {}
    try:
        if await store._block_watermark(conn, query, "report") is None:
            raise OSError("the day blocks are not built, or their watermark is ahead of this snapshot")
        for _ in range(STATEMENT_RUNS):
            for name in ("fine", "blocks"):
                # the watermark as the service reads it, right before its statement
                watermark = await store._block_watermark(conn, query, "report") if name == "blocks" else None
                sql, args = store._statement(query, "report", watermark)
                async with conn.transaction(readonly=True):
                    await store.settle(conn, work_mem=servicer.EXPORT_WORK_MEM)
                    started = time.perf_counter()
                    cursor = await conn.cursor(sql, *args)
                    rows[name] = 0
                    while found := await cursor.fetch(servicer.EXPORT_CHUNK_ROWS):
                        rows[name] += len(found)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    finally:
        await conn.close()
    out = []
    for name, (key, title) in _EXPORT_STATEMENTS.items():
        result = CaseResult(key, title, unit="rows/s", events=rows[name], throughput=rows[name] / best[name])
        result.note = f"{rows[name]:,} rows in {best[name]:.2f} s, best of {STATEMENT_RUNS} alternating runs"
        out.append(result)
    return out


async def _floors(database_url: str, seeded: report_seed.Seeded) -> dict[str, CaseResult]:
    """What Python alone costs for the rows of two reports: the floor below any SQL.

    The rows the service answers (summed once, untimed, and kept in a
    temporary table) are read again (asyncpg decodes them, and PostgreSQL
    only scans a table of the answer), built into the response
    as the servicer does (``add_rows``), serialized and parsed again, in
    this process, without gRPC or the background load: whatever the
    database's sums cost, a report of this many rows costs at least this on
    this machine.
    """
    from ascribe.attribution.v1 import attribution_pb2 as pb

    from services.attribution.reports import rules, servicer, store

    queries = {
        "r.report_affiliate_by_sub1_country_floor": (
            "floor of the affiliate report: its rows read, built, serialized and parsed in Python (reference)",
            rules.ReportQuery(start=seeded.start, end=seeded.end, groups=("sub1", "country"),
                              affiliate_id=report_seed.affiliate_id(7)),
        ),
        "r.export_floor": (
            "floor of the export: its rows read, built, serialized and parsed in Python (reference)",
            rules.ReportQuery(start=seeded.start, end=seeded.end, groups=("coupon", "country")),
        ),
    }
    conn = await asyncpg.connect(database_url, timeout=10, command_timeout=600)
    # the export's answer (about 21 MB) read from memory, not from temporary files
    await conn.execute("SET temp_buffers = '128MB'")
    out = {}
    try:
        for key, (title, query) in queries.items():
            async with conn.transaction(readonly=True):
                await store.settle(conn, work_mem=servicer.EXPORT_WORK_MEM)
                found = await store.records(conn, query)
            if not found:
                out[key] = CaseResult(key, title, status=FAILED, note="the report answered no row")
                continue
            columns = list(found[0].keys())
            # the keys of these groupings are text, the sums bigint
            await conn.execute("DROP TABLE IF EXISTS pg_temp.floor_rows")
            await conn.execute(
                "CREATE TEMP TABLE floor_rows ("
                + ", ".join(f"{c} {'text' if c.startswith('k_') else 'bigint'}" for c in columns) + ")"
            )
            await conn.copy_records_to_table("floor_rows", records=[tuple(r) for r in found], columns=columns)
            seconds, reading = [], []
            for _ in range(FLOOR_RUNS):
                started = time.perf_counter()
                rows = await conn.fetch(f"SELECT {', '.join(columns)} FROM floor_rows")
                read = time.perf_counter()
                answer = pb.GetReportResponse()
                servicer.add_rows(query, rows, answer.rows)
                pb.GetReportResponse.FromString(answer.SerializeToString())
                seconds.append(time.perf_counter() - started)
                reading.append(read - started)
            seconds.sort()
            reading.sort()
            # throughput from the best run; p50 the median (five runs make no p95 or p99)
            result = CaseResult(key, title, unit="rows/s", events=len(found), throughput=len(found) / seconds[0])
            result.p50_ms = seconds[len(seconds) // 2] * 1000
            result.extra["read_ms_best"] = round(reading[0] * 1000, 1)
            result.note = (
                f"{len(found):,} rows, best of {FLOOR_RUNS} {seconds[0] * 1000:.0f} ms (reading them"
                f" {reading[0] * 1000:.0f} ms), median {result.p50_ms:.0f} ms"
            )
            out[key] = result
    finally:
        await conn.close()
    return out


async def _seed(database_url: str, clicks: int, conversions: int) -> report_seed.Seeded:
    conn = await asyncpg.connect(database_url, timeout=10, command_timeout=3600)
    try:
        return await report_seed.seed(conn, clicks, conversions)
    finally:
        await conn.close()


def _request(message: Any, seeded: report_seed.Seeded, **fields: Any) -> Any:
    request = message(**fields)
    getattr(request, "from").FromDatetime(seeded.start)
    request.to.FromDatetime(seeded.end)
    return request


async def _time_reports(
    addr: str, seeded: report_seed.Seeded, keys: list[tuple[str, str, Goal]]
) -> list[CaseResult]:
    from ascribe.attribution.v1 import attribution_pb2 as pb
    from ascribe.attribution.v1 import attribution_pb2_grpc as pb_grpc

    g = pb.ReportGroupBy
    requests = {
        "r.report_campaign_by_coupon": _request(
            pb.GetReportRequest, seeded, campaign_id=report_seed.campaign_id(3), group_by=[g.REPORT_GROUP_BY_COUPON]
        ),
        "r.report_account_by_day_kolkata": _request(
            pb.GetReportRequest, seeded, time_zone="Asia/Kolkata", group_by=[g.REPORT_GROUP_BY_DAY]
        ),
        "r.report_affiliate_by_sub1_country": _request(
            pb.GetReportRequest, seeded, affiliate_id=report_seed.affiliate_id(7),
            group_by=[g.REPORT_GROUP_BY_SUB1, g.REPORT_GROUP_BY_COUNTRY],
        ),
    }
    out = []
    async with grpc.aio.insecure_channel(addr) as channel:
        reports = pb_grpc.ReportServiceStub(channel)
        for key, title, goal in keys:
            if key == "r.export":
                out.append(await _time_export(reports, seeded, key, title, goal))
                continue
            latencies: list[int] = []
            rows = 0
            try:
                for _ in range(RUNS):
                    # Each run's range ends a second later: nothing could be served from a cache.
                    request = requests[key]
                    request.to.FromDatetime(request.to.ToDatetime() + timedelta(seconds=1))
                    started = time.perf_counter_ns()
                    answer = await reports.GetReport(request, timeout=60)
                    latencies.append((time.perf_counter_ns() - started) // 1000)
                    rows = len(answer.rows)
            except grpc.RpcError as error:
                out.append(CaseResult(key, title, status=FAILED, note=str(error)[:200], goals=[goal]))
                continue
            latencies.sort()
            result = CaseResult(key, title, unit="reports/s", events=RUNS, goals=[goal])
            result.throughput = RUNS / (sum(latencies) / 1e6)
            result.p50_ms, result.p95_ms, result.p99_ms = (percentile(latencies, q) / 1000 for q in (0.5, 0.95, 0.99))
            result.note = f"{RUNS} runs, {rows:,} rows each, while 500 clicks/s and 100 conversions/s are written"
            out.append(result)
    return out


async def _time_export(reports: Any, seeded: report_seed.Seeded, key: str, title: str, goal: Goal) -> CaseResult:
    from ascribe.attribution.v1 import attribution_pb2 as pb

    g = pb.ReportGroupBy
    request = _request(pb.ExportReportRequest, seeded, group_by=[g.REPORT_GROUP_BY_COUPON, g.REPORT_GROUP_BY_COUNTRY])
    rows = 0
    started = time.perf_counter()
    try:
        async for chunk in reports.ExportReport(request, timeout=600):
            rows += len(chunk.rows)
    except grpc.RpcError as error:
        return CaseResult(key, title, status=FAILED, note=str(error)[:200], goals=[goal])
    elapsed = time.perf_counter() - started
    result = CaseResult(key, title, unit="rows/s", throughput=rows / elapsed, events=rows, goals=[goal])
    result.note = f"{rows:,} rows in {elapsed:.2f} s, while 500 clicks/s and 100 conversions/s are written"
    result.status = AVAILABLE
    return result

