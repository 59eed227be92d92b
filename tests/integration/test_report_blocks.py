"""Whole UTC days: day blocks of codes by country (migrations 020-022) and the daily code tier's edges, exact.

Real PostgreSQL; events inserted by SQL (the triggers write the rollups), the
blocks' pass run as every replica's compaction job runs it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.attribution import metrics
from services.attribution.migrate import migrate, migration_files
from services.attribution.reports import compaction
from services.attribution.reports import store as report_store
from services.attribution.reports.rules import BLOCK_DAYS, ReportQuery
from tests.support import sample

Key = tuple[str, str, str]  # coupon, country, currency


async def _catalog(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO campaigns (id, name, landing_url, currency, postback_token_sha256)"
                       " VALUES ('cmp', 'cmp', 'https://shop.example/', 'EUR', '\\x00'),"
                       "        ('usd', 'usd', 'https://shop.example/', 'USD', '\\x00')")
    await conn.execute("INSERT INTO affiliates (id, name, channel) VALUES ('a1', 'a1', 'social')")
    await conn.fetchval("SELECT ascribe_ensure_click_partitions(40, 1)")


async def _clicks(conn: asyncpg.Connection, *clicks: tuple[str, datetime, str, str, str]) -> None:
    """One INSERT of (click_id, at, campaign, coupon, country) clicks."""
    await conn.execute(
        """INSERT INTO clicks (click_id, created_at, campaign_id, affiliate_id, coupon_code, country, occurred_at,
                               decision, channel, currency)
           SELECT k, t, c, 'a1', code, country, t, 'accepted', 'social', CASE c WHEN 'usd' THEN 'USD' ELSE 'EUR' END
             FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[]) AS x(k, t, c, code, country)""",
        [c[0] for c in clicks], [c[1] for c in clicks], [c[2] for c in clicks], [c[3] for c in clicks],
        [c[4] for c in clicks],
    )


async def _order(conn: asyncpg.Connection, order_id: str, at: datetime, coupon: str, amount: int) -> None:
    await conn.execute(
        """INSERT INTO conversions (id, campaign_id, order_id, fingerprint, status, reasons, source, coupon_code,
                                    affiliate_id, amount_micros, currency, received_at, occurred_at, request)
           VALUES ($1, 'cmp', $1, '\\x00', 'pending', '{}', 'coupon', $3, 'a1', $4, 'EUR', $2, $2, $5)""",
        order_id, at, coupon, amount,
        json.dumps({"report": {"country": "DE", "device": "", "channel": "social", "sub1": ""}}),
    )


def _by_coupon_and_country(start: datetime, end: datetime, **filters: str) -> ReportQuery:
    return ReportQuery(start=start, end=end, groups=("coupon", "country"), **filters)


async def _sums(conn: asyncpg.Connection, query: ReportQuery, source: report_store.Source) -> dict[Key, tuple[int, ...]]:
    return {
        (str(r.keys["coupon"]), str(r.keys["country"]), r.currency): (
            r.totals.clicks, r.totals.conversions, r.totals.pending, r.totals.reversed, r.totals.revenue_micros,
        )
        for r in await report_store.sums(conn, query, source)
    }


async def _reads_blocks(conn: asyncpg.Connection, query: ReportQuery) -> bool:
    watermark = await report_store._block_watermark(conn, query, "report")
    sql, _ = report_store._statement(query, "report", watermark)
    return "report_block_coupon_country" in sql


async def _exact(conn: asyncpg.Connection, query: ReportQuery) -> dict[Key, tuple[int, ...]]:
    reported = await _sums(conn, query, "report")
    assert reported == await _sums(conn, query, "raw")
    return reported


async def _clicks_per_length(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch("SELECT days, sum(clicks)::bigint AS n FROM report_block_coupon_country GROUP BY days")
    return {r["days"]: r["n"] for r in rows}


# the key of day six's click in every block that holds day six (the report reads one of them)
_SHIFT_DAY_SIX = """UPDATE report_block_coupon_country SET clicks = clicks + $1
                     WHERE bucket <= $2 AND bucket + days * interval '1 day' > $2
                       AND (campaign_id, coupon, country) = ('cmp', 'C0', 'DE')"""


@pytest.fixture
def day0() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=20)


async def test_whole_days_come_from_the_blocks_and_the_rows_above_their_watermark(
    db: asyncpg.Connection, day0: datetime
) -> None:
    await _catalog(db)
    for i in range(13):  # a click a day, another in USD every third day
        at = day0 + timedelta(days=i, hours=5)
        await _clicks(db, (f"k{i}", at, "cmp", f"C{i % 3}", ("DE", "FR")[i % 2]))
        if i % 3 == 0:
            await _clicks(db, (f"u{i}", at, "usd", "C0", "DE"))
    await _order(db, "o1", day0 + timedelta(days=4, hours=1), "C1", 7_000_000)
    # in the blocks of the edges' days, outside the range, keys of their own:
    # taken away again, with no row of zeros left behind
    await _clicks(db, ("early", day0 + timedelta(hours=1), "cmp", "C9", "IT"),
                  ("after", day0 + timedelta(days=12, hours=22), "cmp", "C8", "ES"))
    # unaligned edges, 11 whole days between them
    query = _by_coupon_and_country(day0 + timedelta(hours=3, minutes=7), day0 + timedelta(days=12, hours=6, seconds=1))

    # Before the first pass there are no blocks: the fine tier answers.
    assert not await _reads_blocks(db, query)
    before = await _exact(db, query)
    assert sum(v[0] for v in before.values()) == 13 + 5 and sum(v[1] for v in before.values()) == 1

    await db.fetchval(report_store.COMPACT_ALL)
    assert await _reads_blocks(db, query)
    assert await _exact(db, query) == before
    # every length of block holds every click once
    assert await _clicks_per_length(db) == dict.fromkeys(BLOCK_DAYS, 13 + 5 + 2)
    # Edges of more than half a day are their days' blocks less the rest of
    # those days; shorter ones the fine rows themselves.
    for a, b in ((3, 6), (20, 6), (3, 20), (20, 20), (0, 23)):
        edged = _by_coupon_and_country(day0 + timedelta(hours=a, minutes=7), day0 + timedelta(days=12, hours=b))
        assert await _reads_blocks(db, edged)
        keys = {coupon for coupon, _, _ in await _exact(db, edged)}
        assert ("C9" in keys) == (a == 0) and ("C8" in keys) == (b == 23)

    # What the blocks hold is what the report says: a block changed behind the
    # report's back changes it, and the drift check sees it.
    await db.execute(_SHIFT_DAY_SIX, 100, day0 + timedelta(days=6))
    assert sum(v[0] for v in (await _sums(db, query, "report")).values()) == 13 + 5 + 100
    assert await report_store.drift(db, query.start, query.end)
    await db.execute(_SHIFT_DAY_SIX, -100, day0 + timedelta(days=6))

    # Written after the pass: read from the fine tier above the watermark.
    await _clicks(db, ("late1", day0 + timedelta(days=7, hours=9), "cmp", "C1", "FR"),
                  ("late2", day0 + timedelta(days=7, hours=9), "cmp", "C1", "FR"))
    await db.execute("UPDATE conversions SET status = 'reversed', refunded_micros = amount_micros WHERE id = 'o1'")
    after = await _exact(db, query)
    assert after[("C1", "FR", "EUR")][0] == before[("C1", "FR", "EUR")][0] + 2
    assert after[("C1", "DE", "EUR")][2:] == (0, 1, 0)  # pending 0, reversed 1, no revenue
    # filters narrow the blocks as they do the fine rows
    assert await _exact(db, _by_coupon_and_country(query.start, query.end, country="DE", campaign_id="usd")) == {
        ("C0", "DE", "USD"): (5, 0, 0, 0, 0)
    }

    await db.fetchval(report_store.COMPACT_ALL)
    assert await _exact(db, query) == after
    assert await _clicks_per_length(db) == dict.fromkeys(BLOCK_DAYS, 13 + 5 + 2 + 2)
    assert await report_store.drift(db, day0 - timedelta(days=1), day0 + timedelta(days=15)) == []


async def test_a_transaction_open_during_a_pass_is_taken_by_the_next(
    db: asyncpg.Connection, database_url: str, day0: datetime
) -> None:
    await _catalog(db)
    query = _by_coupon_and_country(day0, day0 + timedelta(days=3))
    at = day0 + timedelta(days=1, hours=2)
    await db.fetchval(report_store.COMPACT_ALL)  # the first pass: blocks from now on
    late = await asyncpg.connect(database_url, timeout=10)
    try:
        async with late.transaction():
            await _clicks(late, ("k1", at, "cmp", "C1", "DE"))  # opens first, commits last
            await _clicks(db, ("k2", at, "cmp", "C1", "DE"))
            await db.fetchval(report_store.COMPACT_ALL)  # behind the open transaction: takes neither
            assert await _clicks_per_length(db) == {}
            assert await _exact(db, query) == {("C1", "DE", "EUR"): (1, 0, 0, 0, 0)}
        assert await _exact(db, query) == {("C1", "DE", "EUR"): (2, 0, 0, 0, 0)}
    finally:
        await late.close()
    await db.fetchval(report_store.COMPACT_ALL)
    assert await _clicks_per_length(db) == dict.fromkeys(BLOCK_DAYS, 2)
    assert await _exact(db, query) == {("C1", "DE", "EUR"): (2, 0, 0, 0, 0)}
    # the fine tier's key of both clicks is one row now, with no transaction id (the blocks hold it)
    assert [tuple(r) for r in await db.fetch("SELECT clicks, xid FROM report_rollup")] == [(2, None)]


@pytest.fixture
async def database_before_020(empty_db: asyncpg.Connection) -> asyncpg.Connection:
    await migrate(empty_db, up_to=19)
    return empty_db


async def test_rows_written_before_020_go_into_the_first_blocks(
    database_before_020: asyncpg.Connection, day0: datetime
) -> None:
    conn = database_before_020
    await _catalog(conn)
    at = day0 + timedelta(days=2, hours=3)
    await _clicks(conn, ("k1", at, "cmp", "C1", "DE"))
    await _clicks(conn, ("k2", at, "cmp", "C1", "DE"))  # another row of the same key, unfolded

    assert await migrate(conn) == [v for v, _ in migration_files() if v >= 20]
    query = _by_coupon_and_country(day0, day0 + timedelta(days=5))
    assert await conn.fetchval("SELECT count(*) FROM report_rollup WHERE xid IS NULL") == 2
    assert not await _reads_blocks(conn, query)  # never built: no blocks yet
    assert await _exact(conn, query) == {("C1", "DE", "EUR"): (2, 0, 0, 0, 0)}
    await _clicks(conn, ("k3", at, "cmp", "C1", "DE"))  # after the upgrade: with its transaction's id

    assert await conn.fetchval(report_store.COMPACT_ALL) >= 2
    assert await _reads_blocks(conn, query)
    assert await _clicks_per_length(conn) == dict.fromkeys(BLOCK_DAYS, 3)
    assert await _exact(conn, query) == {("C1", "DE", "EUR"): (3, 0, 0, 0, 0)}
    assert [tuple(r) for r in await conn.fetch("SELECT clicks, xid FROM report_rollup")] == [(3, None)]


async def test_a_pass_between_the_watermarks_two_reads_counts_nothing_twice(
    db: asyncpg.Connection, day0: datetime
) -> None:
    """A report reads the watermark, then its statement: the statement's own bound decides."""
    await _catalog(db)
    query = _by_coupon_and_country(day0, day0 + timedelta(days=3))
    at = day0 + timedelta(days=1, hours=2)
    await db.fetchval(report_store.COMPACT_ALL)
    stale = await report_store._block_watermark(db, query, "report")
    assert stale is not None
    await _clicks(db, ("k1", at, "cmp", "C1", "DE"), ("k2", at, "cmp", "C2", "FR"))
    await db.fetchval(report_store.COMPACT_ALL)  # the clicks go into the blocks, the watermark moves past them
    assert await _clicks_per_length(db) == dict.fromkeys(BLOCK_DAYS, 2)
    sql, args = report_store._statement(query, "report", stale)
    found = {(r["k_coupon"], r["k_country"]): r["clicks"] for r in await db.fetch(sql, *args)}
    assert found == {("C1", "DE"): 1, ("C2", "FR"): 1}


async def test_transaction_ids_that_went_back_rebuild_the_blocks(db: asyncpg.Connection, day0: datetime) -> None:
    """A logical restore into another cluster: rows and watermark keep the old cluster's transaction ids."""
    await _catalog(db)
    query = _by_coupon_and_country(day0, day0 + timedelta(days=3))
    at = day0 + timedelta(days=1, hours=2)
    await _clicks(db, ("k1", at, "cmp", "C1", "DE"))
    await db.fetchval(report_store.COMPACT_ALL)
    # as restored: a watermark and a row's id far ahead of this cluster's
    await db.execute("UPDATE report_block_watermarks SET watermark = '9000000000'")
    await db.execute("UPDATE report_rollup SET xid = '8999999999'")
    await _clicks(db, ("k2", at, "cmp", "C1", "DE"))  # written after the restore: a lower id
    assert not await _reads_blocks(db, query)  # a watermark ahead of the snapshot is not used
    assert await _exact(db, query) == {("C1", "DE", "EUR"): (2, 0, 0, 0, 0)}

    await db.fetchval(report_store.COMPACT_ALL)
    assert await _reads_blocks(db, query)
    assert await _clicks_per_length(db) == dict.fromkeys(BLOCK_DAYS, 2)
    assert await _exact(db, query) == {("C1", "DE", "EUR"): (2, 0, 0, 0, 0)}
    await _clicks(db, ("k3", at, "cmp", "C1", "DE"))
    assert await _exact(db, query) == {("C1", "DE", "EUR"): (3, 0, 0, 0, 0)}


async def _block_state(conn: asyncpg.Connection) -> asyncpg.Record:
    found = await conn.fetchrow(
        "SELECT watermark, backfill_low, backfilled_until FROM report_block_watermarks"
        " WHERE tier = 'report_block_coupon_country'"
    )
    assert found is not None
    return found


async def test_the_first_pass_walks_the_fine_tier_in_chunks(
    database_before_020: asyncpg.Connection, day0: datetime
) -> None:
    """Migration 022: at most chunk_rows rows a pass; rows written meanwhile into walked buckets are not missed."""
    conn = database_before_020
    await _catalog(conn)
    for i in range(6):  # written before 020: no transaction id
        await _clicks(conn, (f"old{i}", day0 + timedelta(days=i, hours=1), "cmp", "C1", "DE"))
    await _clicks(conn, ("old2b", day0 + timedelta(days=2, hours=1), "cmp", "C1", "DE"))  # a second row of a key
    same_bucket = day0 + timedelta(days=3, hours=4)  # more rows in one bucket than a chunk
    await _clicks(conn, ("b1", same_bucket, "cmp", "C1", "FR"), ("b2", same_bucket, "cmp", "C2", "FR"),
                  ("b3", same_bucket, "cmp", "C3", "FR"))
    await migrate(conn)
    await _clicks(conn, ("new1", day0 + timedelta(days=4, hours=2), "cmp", "C1", "DE"))
    query = _by_coupon_and_country(day0, day0 + timedelta(days=7))
    total = 6 + 1 + 3 + 1

    async def walk(chunk_rows: int, late: str) -> int:
        passes = 0
        while not await report_store.blocks_built(conn):
            assert passes < 20, "the walk does not end"
            await conn.fetchval("SELECT ascribe_report_compact($1)", chunk_rows)
            passes += 1
            if passes == 1:
                # into a bucket the walk has passed: the next pass takes it; into
                # one it has not reached: its chunk takes it, once
                assert day0 < (await _block_state(conn))["backfilled_until"] < day0 + timedelta(days=5)
                await _clicks(conn, (late, day0 + timedelta(minutes=5), "cmp", "C1", "DE"),
                              (f"{late}-ahead", day0 + timedelta(days=5, hours=7), "cmp", "C2", "FR"))
            if (await _block_state(conn))["watermark"] is None:
                assert not await _reads_blocks(conn, query)  # no block until the last chunk
                await _exact(conn, query)
        return passes

    assert await walk(2, "late1") > 3
    total += 2
    assert await _reads_blocks(conn, query)
    assert await _clicks_per_length(conn) == dict.fromkeys(BLOCK_DAYS, total)
    exact = await _exact(conn, query)
    assert sum(v[0] for v in exact.values()) == total
    assert tuple(await _block_state(conn))[1:] == (None, None)
    # the walked keys' rows folded: day two's two old rows are one
    assert await conn.fetchval(
        "SELECT count(*) FROM report_rollup WHERE bucket = $1 AND coupon = 'C1'", day0 + timedelta(days=2, hours=1)
    ) == 1

    # A restore in the middle of a walk (ids behind the last chunk's): it starts again from every row.
    await conn.execute("UPDATE report_block_watermarks SET watermark = NULL, backfill_low = '9000000000',"
                       " backfilled_until = $1", day0 + timedelta(days=3))
    assert await walk(3, "late2") > 1
    total += 2
    assert await _clicks_per_length(conn) == dict.fromkeys(BLOCK_DAYS, total)
    assert sum(v[0] for v in (await _exact(conn, query)).values()) == total


async def test_the_compaction_job_says_whether_the_blocks_are_built(database_url: str) -> None:
    """ascribe_report_blocks_built and ascribe_report_compaction_seconds, from the job every replica runs."""
    passes = sample(metrics.REPORT_COMPACTION_SECONDS, "_count") or 0.0
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    other = await asyncpg.connect(database_url)
    try:
        assert await compaction.compact_once(pool) is not None  # nothing to walk: built at once
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 1
        assert sample(metrics.REPORT_COMPACTION_SECONDS, "_count") == passes + 1

        # a rebuild waits for the pass another replica is running: this one only reports it
        await other.execute("UPDATE report_block_watermarks SET watermark = NULL")
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock(hashtextextended('ascribe_report_compact', 0))")
            assert await compaction.compact_once(pool) is None
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 0
        assert sample(metrics.REPORT_COMPACTION_SECONDS, "_count") == passes + 1

        assert await compaction.compact_once(pool) is not None
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 1

        # a watermark ahead of every snapshot (a restore): reports read no block, and the gauge says so
        await other.execute("UPDATE report_block_watermarks SET watermark = '9000000000'")
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock(hashtextextended('ascribe_report_compact', 0))")
            assert await compaction.compact_once(pool) is None
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 0

        # a pass that fails is counted, and the gauge is still read
        failures = sample(metrics.REPORT_COMPACTION_FAILURES_TOTAL) or 0.0
        await other.execute("UPDATE report_block_watermarks SET watermark = NULL")
        await other.execute("UPDATE report_block_watermarks SET tier = 'moved'")
        with pytest.raises(asyncpg.RaiseError, match="no block watermark"):
            await compaction.compact_once(pool)
        assert sample(metrics.REPORT_COMPACTION_FAILURES_TOTAL) == failures + 1
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 0
        await other.execute("UPDATE report_block_watermarks SET tier = 'report_block_coupon_country'")
        assert await compaction.compact_once(pool) is not None
        assert sample(metrics.REPORT_BLOCKS_BUILT) == 1
    finally:
        await other.close()
        await pool.close()


async def test_a_campaigns_codes_read_long_edges_as_their_days_in_the_daily_tier_less_the_rest(
    db: asyncpg.Connection, day0: datetime
) -> None:
    """The daily code tier (migration 014) takes the edge rule of the blocks: a day's row less the rest of its day."""
    await _catalog(db)
    for i in range(5):
        await _clicks(db, (f"k{i}", day0 + timedelta(days=i, hours=5), "cmp", f"C{i % 2}", "DE"))
    await _order(db, "o1", day0 + timedelta(days=1, hours=20), "C1", 7_000_000)
    # outside every range below but inside its edges' days; another campaign's click is never counted
    await _clicks(db, ("early", day0 + timedelta(hours=1), "cmp", "C9", "IT"),
                  ("after", day0 + timedelta(days=4, hours=22), "cmp", "C8", "ES"),
                  ("other", day0 + timedelta(days=2, hours=3), "usd", "C0", "DE"))
    for a, b in ((3, 6), (20, 6), (3, 20), (20, 20), (0, 23)):
        query = ReportQuery(start=day0 + timedelta(hours=a, minutes=7), end=day0 + timedelta(days=4, hours=b),
                            groups=("coupon",), campaign_id="cmp")
        sql, _ = report_store._statement(query, "report")
        assert "report_rollup_coupon_day" in sql
        # every edge here of more than half a day is its day's row less the rest of that day
        assert ("-clicks AS clicks" in sql) == ((a, b) != (20, 6))
        found = {}
        for source in ("report", "raw"):
            found[source] = {
                (r.keys["coupon"], r.currency): (r.totals.clicks, r.totals.conversions, r.totals.revenue_micros)
                for r in await report_store.sums(db, query, source)
            }
        assert found["report"] == found["raw"]
        codes = {code for code, _ in found["report"]}
        assert ("C9" in codes) == (a == 0) and ("C8" in codes) == (b == 23)
        assert sum(v[0] for v in found["report"].values()) == (a == 0) + (a < 5) + 3 + (b > 5) + (b == 23)
