"""The reporting data set: clicks and conversions COPYed straight into the tables.

20 campaigns (15 in EUR, 5 in USD), 50 affiliates on 5 channels, 2,000 codes
(100 a campaign, every tenth a limited one), 500 sub1 values, 60 countries,
3 devices, 30 days. The rows are generated once per size into CSV files in
the cache folder (``ASCRIBE_BENCH_CACHE``, default ``~/.cache/ascribe-bench``)
and COPYed from there on every run; the COPY fires the rollup triggers like
any other insert (one statement, one aggregate), then the deltas are folded.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from services.attribution.reports import store as report_store

CAMPAIGNS = 20
AFFILIATES = 50
CODES_PER_CAMPAIGN = 100
SUB1S = 500
COUNTRIES = [
    "US", "DE", "FR", "GB", "IN", "NP", "BR", "JP", "CN", "IT", "ES", "NL", "SE", "NO", "FI", "DK", "PL", "CZ",
    "AT", "CH", "BE", "PT", "IE", "GR", "TR", "RU", "UA", "RO", "HU", "BG", "MX", "AR", "CL", "CO", "PE", "CA",
    "AU", "NZ", "ZA", "NG", "EG", "KE", "MA", "SA", "AE", "IL", "PK", "BD", "LK", "TH", "VN", "MY", "SG", "ID",
    "PH", "KR", "TW", "HK", "IR", "IQ",
]
DEVICES = ["mobile", "desktop", "tablet"]
CHANNELS = ["social", "email", "search", "display", "influencer"]
DAYS = 30
_VERSION = 2  # bump when the generated rows change shape

CLICK_COLUMNS = (
    "click_id", "created_at", "campaign_id", "affiliate_id", "coupon_code", "requested_coupon_code", "sub1",
    "country", "device_type", "occurred_at", "decision", "is_unique", "channel", "currency",
)
CONVERSION_COLUMNS = (
    "id", "campaign_id", "order_id", "fingerprint", "status", "affiliate_id", "source", "coupon_code",
    "amount_micros", "discount_micros", "refunded_micros", "currency", "payout_micros", "holds_coupon_use",
    "received_at", "occurred_at", "request",
)


@dataclass(frozen=True)
class Seeded:
    start: datetime
    end: datetime
    seconds: float
    generated: bool  # False: the rows came from the cache
    disk_bytes: dict[str, int]


def campaign_id(i: int) -> str:
    return f"rs_c{i:02d}"


def affiliate_id(i: int) -> str:
    return f"rs_a{i:02d}"


def _cache_dir() -> Path:
    folder = Path(os.environ.get("ASCRIBE_BENCH_CACHE", Path.home() / ".cache" / "ascribe-bench"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _generate(clicks: int, conversions: int, end: datetime, click_path: Path, conversion_path: Path) -> None:
    rng = random.Random(14)
    start = end - timedelta(days=DAYS)
    span = int((end - start).total_seconds())
    currencies = ["USD" if c % 4 == 3 else "EUR" for c in range(CAMPAIGNS)]

    def stamp(at: datetime) -> str:
        return at.isoformat()

    with click_path.open("w", newline="") as f:
        out = csv.writer(f)
        for n in range(clicks):
            at = start + timedelta(seconds=rng.randrange(span))
            c = rng.randrange(CAMPAIGNS)
            code = f"RS{c:02d}C{rng.randrange(CODES_PER_CAMPAIGN):03d}"
            tracked = rng.random() < 0.8
            a = rng.randrange(AFFILIATES)
            out.writerow([
                f"rsk{n:08d}", stamp(at), campaign_id(c), affiliate_id(a),
                code if tracked else "", code, f"s{rng.randrange(SUB1S)}", rng.choice(COUNTRIES),
                rng.choice(DEVICES), stamp(at), "rejected" if rng.random() < 0.02 else "accepted",
                "t" if rng.random() < 0.7 else "f", CHANNELS[a % len(CHANNELS)], currencies[c],
            ])
    with conversion_path.open("w", newline="") as f:
        out = csv.writer(f)
        for n in range(conversions):
            at = start + timedelta(seconds=rng.randrange(span))
            c = rng.randrange(CAMPAIGNS)
            a = rng.randrange(AFFILIATES)
            status = rng.choices(["pending", "approved", "flagged", "rejected", "reversed"], [40, 40, 5, 10, 5])[0]
            amount = rng.randrange(5_000_000, 300_000_000)
            refunded = amount if status == "reversed" else (amount // 4 if rng.random() < 0.05 else 0)
            live = status in ("pending", "approved", "flagged")
            report = {"country": rng.choice(COUNTRIES), "device": rng.choice(DEVICES),
                      "channel": CHANNELS[a % len(CHANNELS)], "sub1": f"s{rng.randrange(SUB1S)}"}
            out.writerow([
                f"rsv{n:08d}", campaign_id(c), f"o{n}", "\\x00", status, affiliate_id(a), "click",
                f"RS{c:02d}C{rng.randrange(CODES_PER_CAMPAIGN):03d}", amount, amount // 10, refunded,
                currencies[c], amount // 10 if live else 0, "t" if live else "f", stamp(at), stamp(at),
                json.dumps({"report": report}),
            ])


async def seed(conn: asyncpg.Connection, clicks: int, conversions: int) -> Seeded:
    """Seeds the bench database (the catalog by INSERT, the events by COPY) and folds the rollups."""
    folder = _cache_dir()
    name = f"reports-v{_VERSION}-{clicks}-{conversions}"
    meta_path, click_path, conversion_path = (folder / f"{name}.{ext}" for ext in ("json", "clicks.csv", "conv.csv"))
    started = time.perf_counter()
    generated = not (meta_path.exists() and click_path.exists() and conversion_path.exists())
    if generated:
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        _generate(clicks, conversions, end, click_path, conversion_path)
        meta_path.write_text(json.dumps({"end": end.isoformat()}))
    end = datetime.fromisoformat(json.loads(meta_path.read_text())["end"])
    start = end - timedelta(days=DAYS)
    await conn.executemany(
        """INSERT INTO campaigns (id, name, landing_url, currency, postback_token_sha256)
           VALUES ($1, $1, 'https://shop.example/', $2, '\\x00')""",
        [(campaign_id(c), "USD" if c % 4 == 3 else "EUR") for c in range(CAMPAIGNS)],
    )
    await conn.executemany(
        "INSERT INTO affiliates (id, name, channel) VALUES ($1, $1, $2)",
        [(affiliate_id(a), CHANNELS[a % len(CHANNELS)]) for a in range(AFFILIATES)],
    )
    await conn.executemany(
        "INSERT INTO coupons (campaign_id, code, kind, allow_all_affiliates, usage_limit) VALUES ($1, $2, 'general', true, $3)",
        [
            (campaign_id(c), f"RS{c:02d}C{k:03d}", 100_000 if k % 10 == 0 else 0)
            for c in range(CAMPAIGNS) for k in range(CODES_PER_CAMPAIGN)
        ],
    )
    # Daily partitions for the whole range (rows outside them would go to the default one).
    days_back = (datetime.now(UTC).date() - start.date()).days + 1
    await conn.fetchval("SELECT ascribe_ensure_click_partitions($1, 1)", days_back)
    await conn.copy_to_table("clicks", source=click_path, columns=list(CLICK_COLUMNS), format="csv", timeout=1800)
    await conn.copy_to_table(
        "conversions", source=conversion_path, columns=list(CONVERSION_COLUMNS), format="csv", timeout=1800
    )
    # Statistics first: folding a million fresh rollup rows on a table the
    # planner has never seen can pick a nested loop (minutes instead of seconds).
    await conn.execute("ANALYZE")
    # (the first passes also fill the day blocks, a million rows a pass: about 90 s each)
    for _ in range(1000):  # a million rows a pass: the full seed takes about a dozen
        await conn.fetchval(report_store.COMPACT_ALL, timeout=7200)
        if await report_store.blocks_built(conn):
            break
    else:
        raise RuntimeError("the day blocks were not built after 1,000 passes")
    # What autovacuum keeps up on a live database (insert-driven vacuums set
    # the visibility map the rollup's index-only scans need), done at once.
    await conn.execute("VACUUM (ANALYZE)")
    seconds = time.perf_counter() - started
    disk = {}
    for table in ("clicks", "conversions", "report_rollup", "report_rollup_campaign", "report_rollup_coupon_day",
                  "report_rollup_account", "report_block_coupon_country"):
        # clicks is partitioned: its size is its partitions' (and the default one's)
        disk[table] = int(await conn.fetchval(
            """SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size($1::regclass))
                 FROM pg_partition_tree($1::regclass) WHERE isleaf""",
            table,
        ) or 0)
    return Seeded(start, end, seconds, generated, disk)

