"""Migration 014 on a database that already holds report rollups (an upgrade, not a fresh install)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

from services.attribution.migrate import migrate, migration_files
from services.attribution.reports import store as report_store


async def test_014_rebuilds_the_rollups_under_the_new_keys(empty_db: asyncpg.Connection) -> None:
    conn = empty_db
    # The schema as it was before 014.
    await migrate(conn, up_to=13)
    now = datetime.now(UTC).replace(microsecond=0)
    at = now - timedelta(hours=2)
    await conn.execute("INSERT INTO campaigns (id, name, landing_url, currency, postback_token_sha256)"
                       " VALUES ('cmp', 'cmp', 'https://shop.example/', 'EUR', '\\x00')")
    await conn.execute("INSERT INTO affiliates (id, name, channel) VALUES ('a1', 'a1', 'social')")
    await conn.fetchval("SELECT ascribe_ensure_click_partitions(2, 1)")
    for click_id, affiliate in (("k1", "a1"), ("k2", "ghost")):
        await conn.execute(
            "INSERT INTO clicks (click_id, created_at, campaign_id, affiliate_id, occurred_at, decision)"
            " VALUES ($1, $2, 'cmp', $3, $2, 'accepted')", click_id, at, affiliate,
        )
    await conn.execute(
        """INSERT INTO conversions (id, campaign_id, order_id, fingerprint, status, reasons, source, coupon_code,
                                    amount_micros, currency, received_at, occurred_at, request)
           VALUES ('v1', 'cmp', 'o1', '\\x00', 'pending', '{unknown_coupon}', 'none', 'NOPE', 10000000, 'EUR',
                   $1, $1, $2)""",
        at, json.dumps({"report": {"country": "", "device": "", "channel": "direct", "sub1": ""}}),
    )
    await conn.execute("UPDATE affiliates SET channel = 'email' WHERE id = 'a1'")

    assert await migrate(conn) == [v for v, _ in migration_files() if v >= 14]  # 014 and every later one
    # A change after the upgrade moves the order under its new keys only.
    await conn.execute("UPDATE conversions SET status = 'rejected' WHERE id = 'v1'")
    assert await report_store.drift(conn, now - timedelta(days=1), now + timedelta(days=1)) == []
    by_coupon = {
        r["coupon"]: (r["pending"], r["rejected"])
        for r in await conn.fetch("SELECT coupon, sum(pending) pending, sum(rejected) rejected"
                                  " FROM report_rollup WHERE conversions <> 0 OR pending <> 0 OR rejected <> 0"
                                  " GROUP BY 1")
    }
    assert by_coupon == {"": (0, 1)}
    affiliates = {r["affiliate_id"]: r["channel"] for r in await conn.fetch(
        "SELECT affiliate_id, channel FROM report_rollup WHERE clicks > 0")}
    assert affiliates == {"a1": "email", "": ""}
