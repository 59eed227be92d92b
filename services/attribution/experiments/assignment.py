"""Assignment on the click path: which arm a click joins, with no query per click.

The open experiments are few, so each replica keeps all of them in memory and
reloads the set every ``ttl_seconds`` (as the catalog cache expires its
entries; 0 reads it on every click, for tests). While a reload runs, clicks use
the set it replaces; only the very first click waits for a load. Create and
Stop on this replica invalidate it at once; other replicas see the change
within the TTL (a click in that window is assigned or not by the old set,
which the result counts consistently: it reads the arms the clicks stored).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from services.attribution.common.database import DATABASE_FAILURES
from services.attribution.common.models import Click, ClickDecision, ExperimentArm
from services.attribution.experiments import store
from services.attribution.experiments.rules import Experiment, arm_for, visitor_key
from services.common.timestamps import utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClickArm:
    """The arm a click joined; ``holdout`` clicks lose their code."""

    experiment_id: str
    arm: ExperimentArm
    unit_key: str

    @property
    def holdout(self) -> bool:
        return self.arm == "control"


class ExperimentCache:
    """The open experiments by (campaign, code), reloaded as a whole."""

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = 1.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._by_code: dict[tuple[str, str], Experiment] | None = None
        self._expires = 0.0
        self._loading: asyncio.Future[dict[tuple[str, str], Experiment]] | None = None

    def invalidate(self) -> None:
        """The next lookup waits for a fresh set (this replica just changed one)."""
        self._by_code = None
        self._expires = 0.0

    async def _load(self) -> dict[tuple[str, str], Experiment]:
        experiments = await store.open_experiments(self._pool, utcnow())
        return {(e.campaign_id, e.coupon_code): e for e in experiments}

    def _loaded(self, task: asyncio.Future[dict[tuple[str, str], Experiment]]) -> None:
        if self._loading is task:
            self._loading = None
        if not task.cancelled() and task.exception() is None:
            self._by_code = task.result()
            self._expires = time.monotonic() + self._ttl
        elif not task.cancelled():
            logger.warning("loading the open experiments failed: %r", task.exception())

    async def find(self, campaign_id: str, code: str) -> Experiment | None:
        if self._ttl <= 0:
            return (await self._load()).get((campaign_id, code))  # caching off: every click reads the set
        by_code = self._by_code
        if by_code is None or time.monotonic() >= self._expires:
            if self._loading is None:
                # A task of its own: a caller whose deadline passes cancels only its wait.
                self._loading = asyncio.ensure_future(self._load())
                self._loading.add_done_callback(self._loaded)
            if by_code is None:
                by_code = await asyncio.shield(self._loading)
        return by_code.get((campaign_id, code))


class ClickAssigner:
    """The click path's one hook: the arm of a judged click, if its code is under experiment."""

    def __init__(self, pool: asyncpg.Pool, cache: ExperimentCache) -> None:
        self._pool = pool
        self._cache = cache

    async def with_arm(self, click: Click) -> Click:
        """GetClick's click with the arm it joined (read from the experiments' own table)."""
        found = await store.click_arm(self._pool, click.click_id)
        if found is None:
            return click
        return replace(click, experiment_id=found[0], experiment_arm=found[1])

    async def assign(
        self,
        *,
        campaign_id: str,
        tracked_code: str,
        decision: ClickDecision,
        vid: str,
        ip: str,
        user_agent: str,
        at: datetime,
    ) -> ClickArm | None:
        """None when the click joins no arm: no tracked code (it failed its rules), fraud-rejected, no experiment.

        A failure to load the experiments is no arm (the click keeps its code,
        as without an experiment): the visitor is never kept waiting for it.
        """
        if not tracked_code or decision == "rejected":
            return None
        try:
            experiment = await self._cache.find(campaign_id, tracked_code)
        except DATABASE_FAILURES as error:
            logger.warning("experiments unavailable; click assigned to no arm: %r", error)
            return None
        if experiment is None or not experiment.running_at(at):
            return None
        unit = visitor_key(vid, ip, user_agent)
        return ClickArm(experiment.id, arm_for(experiment.id, unit, experiment.holdout_percent), unit)
