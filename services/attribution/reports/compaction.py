"""The report compaction job: one pass of ``store.compact`` on every interval, measured."""

from __future__ import annotations

import time

import asyncpg

from services.attribution import metrics
from services.attribution.reports import store


async def compact_once(pool: asyncpg.Pool) -> int | None:
    """One pass (None when another replica holds the compaction lock); the blocks' state as every replica sees it."""
    started = time.perf_counter()
    folded = await store.compact(pool)
    if folded is not None:
        metrics.REPORT_COMPACTION_SECONDS.observe(time.perf_counter() - started)
    metrics.REPORT_BLOCKS_BUILT.set(1 if await store.blocks_built(pool) else 0)
    return folded
