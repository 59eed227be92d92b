"""``make report-drift FROM=... TO=...``: recompute a range from the raw events and compare.

Reads ``ASCRIBE_DATABASE_URL``; prints one line a differing sum and exits 1
when there is any, 0 (and "no drift") otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

from services.attribution.config import database_url_from_env
from services.attribution.reports import store

# A drift check scans every raw event of its range: give it time.
STATEMENT_TIMEOUT_MS = 600_000


def _instant(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def check(url: str, start: datetime, end: datetime) -> int:
    conn = await asyncpg.connect(url, timeout=10, server_settings={
        "TimeZone": "UTC", "statement_timeout": str(STATEMENT_TIMEOUT_MS),
    })
    try:
        # One snapshot for both sides: on a live system an event committed between
        # the report's read and the raw recomputation would be reported as drift.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            found = await store.drift(conn, start, end)
    finally:
        await conn.close()
    for d in found:
        keys = " ".join(f"{k}={v!r}" for k, v in d.keys)
        print(f"{keys} currency={d.currency} {d.field}: report {d.rollup}, raw events {d.raw}")
    if not found:
        print(f"no drift in [{start.isoformat()}, {end.isoformat()})")
    return 1 if found else 0


def main(argv: list[str] | None = None, database_url: str | None = None) -> int:
    now = datetime.now(UTC)
    parser = argparse.ArgumentParser(prog="report-drift", description=__doc__)
    parser.add_argument("--from", dest="start", type=_instant, default=now - timedelta(days=30),
                        help="ISO 8601 instant (default: 30 days ago)")
    parser.add_argument("--to", dest="end", type=_instant, default=now + timedelta(minutes=5),
                        help="ISO 8601 instant (default: now)")
    args = parser.parse_args(argv)
    return asyncio.run(check(database_url or database_url_from_env(), args.start, args.end))


if __name__ == "__main__":
    sys.exit(main())
