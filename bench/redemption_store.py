"""The redemption core on its own, for the benchmark's store cases (e.*).

The conversion path takes uses inside its batch transaction
(``services.attribution.conversions.redemptions``); this wraps the same
``grant_uses`` and ``insert_ledger`` so that concurrent single ``take`` calls
share one transaction, the way conversion batches do, and the bench can set
it beside a naive ``SELECT ... FOR UPDATE`` store.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from services.attribution.conversions.redemptions import CouponKey, LedgerRow, grant_uses, insert_ledger
from services.common.batcher import MicroBatcher

_ids = itertools.count()


class RedemptionStore:
    """Takes single uses of codes, coalescing concurrent requests."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 512, max_in_flight: int = 2) -> None:
        self._pool = pool
        self._batcher: MicroBatcher[tuple[CouponKey, str], int | None] = MicroBatcher(
            self._flush, max_batch=max_batch, max_in_flight=max_in_flight, name="redemptions"
        )

    async def take(self, campaign_id: str, code: str) -> bool:
        """Takes one use; False when the code has none left."""
        return await self._batcher.submit(((campaign_id, code), f"use-{next(_ids)}")) is not None

    async def _flush(self, items: Sequence[tuple[CouponKey, str]]) -> list[int | None]:
        async with self._pool.acquire() as conn, conn.transaction():
            grants = await grant_uses(conn, [key for key, _ in items])
            now = datetime.now().astimezone()
            results = [grant if isinstance(grant, int) else None for grant in grants]
            await insert_ledger(conn, [
                LedgerRow(key[0], key[1], conversion_id, None, now)
                for (key, conversion_id), grant in zip(items, results, strict=True)
                if grant is not None
            ])
        return results

    async def close(self) -> None:
        await self._batcher.close()
