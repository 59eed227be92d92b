"""The rollups' fold (migrations 017 and 021): single rows stay where they are, keys with several rows become one.

Real PostgreSQL; events inserted by SQL, one statement each where a test
needs separate delta rows (the triggers write one set of rows a statement).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.attribution.migrate import migrate, migration_files
from services.attribution.reports import store as report_store

TIERS = ("report_rollup", "report_rollup_campaign", "report_rollup_coupon_day", "report_rollup_account")


async def _catalog(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO campaigns (id, name, landing_url, currency, postback_token_sha256)"
                       " VALUES ('cmp', 'cmp', 'https://shop.example/', 'EUR', '\\x00')")
    await conn.execute("INSERT INTO affiliates (id, name, channel) VALUES ('a1', 'a1', 'social')")
    await conn.fetchval("SELECT ascribe_ensure_click_partitions(2, 1)")


async def _clicks(conn: asyncpg.Connection, at: datetime, *clicks: tuple[str, str]) -> None:
    """One INSERT statement of (click_id, sub1) clicks at ``at``."""
    await conn.execute(
        """INSERT INTO clicks (click_id, created_at, campaign_id, affiliate_id, sub1, occurred_at, decision,
                               channel, currency)
           SELECT k, $1, 'cmp', 'a1', s, $1, 'accepted', 'social', 'EUR' FROM unnest($2::text[], $3::text[]) AS x(k, s)""",
        at, [c[0] for c in clicks], [c[1] for c in clicks],
    )


async def _fine(conn: asyncpg.Connection) -> dict[str, list[tuple[str, int, str | None]]]:
    """The fine tier's rows by sub1: (ctid, clicks, xid: the writer's transaction, None once folded) each."""
    rows: dict[str, list[tuple[str, int, str | None]]] = {}
    for r in await conn.fetch(
        "SELECT ctid::text AS c, sub1, clicks, xid::text AS x FROM report_rollup ORDER BY xid NULLS FIRST, ctid"
    ):
        rows.setdefault(r["sub1"], []).append((r["c"], r["clicks"], r["x"]))
    return rows


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TIERS}


@pytest.fixture
def at() -> datetime:
    return datetime.now(UTC).replace(minute=1, second=0, microsecond=0) - timedelta(hours=2)


async def _no_drift(conn: asyncpg.Connection, at: datetime) -> None:
    assert await report_store.drift(conn, at - timedelta(days=1), at + timedelta(days=1)) == []


async def test_single_rows_stay_and_keys_with_several_rows_become_one(db: asyncpg.Connection, at: datetime) -> None:
    await _catalog(db)
    await _clicks(db, at, ("k1", "s1"), ("k2", "s2"))  # two keys of the fine tier, one statement
    await _clicks(db, at, ("k3", "s1"))  # s1's key again, another statement
    before = await _fine(db)
    assert [n for _, n, _ in before["s1"]] == [1, 1] and len(before["s2"]) == 1
    assert await _counts(db) == dict.fromkeys(TIERS, 2) | {"report_rollup": 3}

    # fine: s1's two rows -> one; every coarser tier: two rows -> one
    assert await db.fetchval(report_store.COMPACT_ALL) == 4
    after = await _fine(db)
    assert after["s2"] == before["s2"]  # the same row, not rewritten (same ctid, its transaction's id kept)
    assert before["s2"][0][2] is not None
    ((_, clicks, xid),) = after["s1"]
    assert (clicks, xid) == (2, None)
    assert await _counts(db) == dict.fromkeys(TIERS, 1) | {"report_rollup": 2}
    assert await db.fetchval("SELECT clicks FROM report_rollup_account") == 3

    # nothing new: nothing to do, nothing touched
    assert await db.fetchval(report_store.COMPACT_ALL) == 0
    assert await _fine(db) == after

    # a later row of a single row's key folds both
    await _clicks(db, at, ("k4", "s2"))
    assert await db.fetchval(report_store.COMPACT_ALL) == 4
    assert [(n, xid) for _, n, xid in (await _fine(db))["s2"]] == [(2, None)]
    await _no_drift(db, at)


async def test_a_row_that_commits_after_a_fold_began_is_folded_by_the_next(
    db: asyncpg.Connection, database_url: str, at: datetime
) -> None:
    """The fine tier's fold goes by transaction (migration 021): a row whose transaction was still open
    at a fold is neither folded nor lost, and the next fold takes it (017's fold by number never did)."""
    await _catalog(db)
    late = await asyncpg.connect(database_url, timeout=10)
    try:
        async with late.transaction():
            await _clicks(late, at, ("k1", "s1"))  # its transaction opens first, commits last
            await _clicks(db, at, ("k2", "s1"))
            await db.fetchval(report_store.COMPACT_ALL)
            # nothing of the fine tier was behind the open transaction: both rows wait
            assert [n for _, n, _ in (await _fine(db))["s1"]] == [1]
            await _no_drift(db, at)
        assert [n for _, n, _ in (await _fine(db))["s1"]] == [1, 1]
        await _no_drift(db, at)
        assert await db.fetchval(report_store.COMPACT_ALL) >= 1
    finally:
        await late.close()
    assert [n for _, n, _ in (await _fine(db))["s1"]] == [2]
    assert await db.fetchval("SELECT sum(clicks) FROM report_rollup_account") == 2
    await _no_drift(db, at)


@pytest.fixture
async def database_before_017(empty_db: asyncpg.Connection) -> asyncpg.Connection:
    await migrate(empty_db, up_to=16)
    return empty_db


async def test_017_folds_what_the_old_fold_left_then_folds_by_number(
    database_before_017: asyncpg.Connection, at: datetime
) -> None:
    conn = database_before_017
    await _catalog(conn)
    await _clicks(conn, at, ("k1", "s1"), ("k2", "s2"))
    await _clicks(conn, at, ("k3", "s1"))  # unfolded deltas (compacted = false) at the upgrade

    assert await migrate(conn) == [v for v, _ in migration_files() if v >= 17]
    # the old fold's last pass, under the new watermarks (rows numbered by 016 are behind them)
    assert {s: [n for _, n, _ in rows] for s, rows in (await _fine(conn)).items()} == {"s1": [2], "s2": [1]}
    assert await conn.fetchval(report_store.COMPACT_ALL) == 0
    await _no_drift(conn, at)
    await _clicks(conn, at, ("k4", "s2"))
    assert await conn.fetchval(report_store.COMPACT_ALL) == 4
    assert [(n, xid) for _, n, xid in (await _fine(conn))["s2"]] == [(2, None)]
    assert await conn.fetchval("SELECT clicks FROM report_rollup_account") == 4
    await _no_drift(conn, at)


async def test_the_fold_of_a_tier_without_a_watermark_fails_loudly(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.RaiseError, match="no fold watermark for report_rollup_typo"):
        await db.fetchval("SELECT ascribe_report_fold('report_rollup_typo', ARRAY['bucket'])")
