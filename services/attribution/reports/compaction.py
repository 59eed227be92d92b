"""The report compaction job: one pass of ``store.compact`` on every interval, measured."""

from __future__ import annotations

import logging
import time

import asyncpg

from services.attribution import metrics
from services.attribution.reports import store

log = logging.getLogger(__name__)


async def compact_once(pool: asyncpg.Pool) -> int | None:
    """One pass (None when another replica holds the compaction lock); the blocks' state as every replica sees it.

    The gauge is read after every attempt, a failed one too: a walk whose
    passes keep failing must show as unbuilt on every replica, not as the
    last state one of them saw.
    """
    started = time.perf_counter()
    try:
        folded = await store.compact(pool)
    except Exception:
        metrics.REPORT_COMPACTION_FAILURES_TOTAL.inc()
        raise
    finally:
        try:
            metrics.REPORT_BLOCKS_BUILT.set(1 if await store.blocks_built(pool) else 0)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as error:
            log.warning("report compaction: cannot read whether the day blocks are built: %s", error)
    if folded is not None:
        metrics.REPORT_COMPACTION_SECONDS.observe(time.perf_counter() - started)
    return folded
