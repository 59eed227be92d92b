"""AssignCode under load: concurrent calls for one batch share a statement.

Each customer's AssignCode is one customer and one code; alone, each
would be a statement whose SKIP LOCKED scan walks past the codes that
concurrent calls hold and those assigned since the last vacuum. The calls that arrive
together (``services.common.batcher``: at once when nothing is in flight,
otherwise with the next flush) go as one ``store.assign_codes`` per batch
of codes, so one scan serves them all. The per-customer statement
(``store.assign_code``) settles whatever the shared one could not: a
customer that a concurrent replica served meanwhile, free codes locked by
others, an exhausted batch (RESOURCE_EXHAUSTED), an unknown batch. An
affiliate's AssignCode does go alone, through ``store.assign_code``:
affiliates are few, and handed codes by an operator.

Each process hands a batch out in code order from where it last took a
code (``store.assign_codes`` says why); replicas keep their own marks, and a
code that one passed over while it was locked is found when the mark wraps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import asyncpg

from services.attribution.catalog import store
from services.attribution.common.database import ABORTED
from services.attribution.common.models import Coupon
from services.common.batcher import MicroBatcher

logger = logging.getLogger(__name__)

Request = tuple[str, str, str]  # campaign_id, batch_id, customer_id
MAX_MARKS = 10_000


class CodeAssigner:
    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 256) -> None:
        self._pool = pool
        # Per batch, the last code this process took: the next scan starts after it.
        self._after: dict[tuple[str, str], str] = {}
        self._batcher: MicroBatcher[Request, Coupon] = MicroBatcher(
            self._flush, max_batch=max_batch, max_in_flight=2, name="assign"
        )

    async def assign(self, campaign_id: str, batch_id: str, customer_id: str) -> Coupon:
        return await self._batcher.submit((campaign_id, batch_id, customer_id))

    async def close(self) -> None:
        await self._batcher.close()

    async def _assign_codes(self, campaign_id: str, batch_id: str, customers: list[str]) -> dict[str, Coupon]:
        """One shared statement from where this process last took a code; once round again if short."""
        key = (campaign_id, batch_id)
        after = self._after.get(key, "")
        found = await store.assign_codes(self._pool, campaign_id, batch_id, customers, after=after)
        if after and len(found) < len(set(customers)):
            # Past the last code: the free ones left (if any) are before the mark.
            rest = [c for c in customers if c not in found]
            found.update(await store.assign_codes(self._pool, campaign_id, batch_id, rest))
        taken = [c.code for c in found.values() if c.code > after]
        self._after[key] = max(taken) if taken else ""
        if len(self._after) > MAX_MARKS:
            self._after.pop(next(iter(self._after)))
        return found

    async def _flush(self, requests: Sequence[Request]) -> list[Coupon | BaseException]:
        by_batch: dict[tuple[str, str], list[str]] = defaultdict(list)
        for campaign_id, batch_id, customer in requests:
            by_batch[(campaign_id, batch_id)].append(customer)
        answers: dict[Request, Coupon | BaseException] = {}
        for (campaign_id, batch_id), customers in by_batch.items():
            try:
                found = await self._assign_codes(campaign_id, batch_id, customers)
            except (asyncpg.UniqueViolationError, *ABORTED, asyncpg.DataError):
                # A customer served elsewhere meanwhile, a deadlock with another
                # replica's batch, or one request's value PostgreSQL refuses:
                # each caller is settled alone below, and fails only by itself.
                found = {}
            for customer in customers:
                key = (campaign_id, batch_id, customer)
                if key in answers:
                    continue
                coupon = found.get(customer)
                if coupon is None:
                    try:
                        coupon = await store.assign_code(self._pool, campaign_id, batch_id, customer)
                    except Exception as error:  # that caller alone fails, with its own error
                        answers[key] = error
                        continue
                answers[key] = coupon
        return [answers[request] for request in requests]
