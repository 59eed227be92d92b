"""Nothing touches the schema before the deferred migrations have run.

When the attribution service starts while PostgreSQL is down it comes up
live but not ready, and runs its migrations once PostgreSQL answers (the
readiness loop retries them: services/common/readiness.py). Until they have
run, the tables may be missing or a version behind: an RPC would fail with
whatever the database says (an undefined table is INTERNAL), and a
background job would act on an old schema. So until then every RPC of the
service's own services is UNAVAILABLE with ``WAITING_MESSAGE`` (health and
reflection stay open: probes must see "not ready", not an error), and the
background jobs have not started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from services.common.readiness import Probe

logger = logging.getLogger(__name__)

WAITING_MESSAGE = (
    "the attribution service is waiting for PostgreSQL to run its start-up migrations; retry shortly"
)


class SchemaGate:
    """Open once the start-up migrations have run; ``pending`` None means they already have."""

    def __init__(self, pending: Probe | None, services: Iterable[str]) -> None:
        self.open = asyncio.Event()
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._pending = pending
        if pending is None:
            self.open.set()

    def deferred_step(self) -> Probe | None:
        """The readiness loop's deferred start-up step, which opens the gate once it has run."""
        pending = self._pending
        if pending is None:
            return None

        async def step() -> None:
            await pending()
            if not self.open.is_set():
                self.open.set()
                logger.info("the deferred start-up migrations ran: serving RPCs, starting background jobs")

        return step

    def refusal(self, full_method: str) -> str | None:
        """The UNAVAILABLE message for an RPC of ours while the gate is shut, else None."""
        if self.open.is_set() or not full_method.startswith(self._prefixes):
            return None
        return WAITING_MESSAGE

    async def after_opening(self, job: Coroutine[Any, Any, None]) -> None:
        """Runs ``job`` once the gate is open (closed unstarted if cancelled before)."""
        try:
            await self.open.wait()
        except BaseException:
            job.close()
            raise
        await job
