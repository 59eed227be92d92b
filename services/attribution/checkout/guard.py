"""The code-guessing guard in front of validation: refuses known guessers without a database query.

The fraud service counts unknown and mistyped codes per customer address
(an IPv6 address per /64) and per customer id. This replica reports each
miss it sees and keeps, from the answers, a small local table of the
addresses and customers past the threshold until their window ends. A
validation looks in that table before anything else (a dict lookup, no
call), so a guesser costs PostgreSQL at most the threshold's worth of
lookups per window, plus the ones in flight when it crossed it, and honest
traffic pays nothing: only misses are reported. Asking the fraud service
before every lookup would cost every validation a round trip for the same
protection. The fraud service being down or late (its deadline) leaves the
table as it is and the validation proceeds: fail open.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable

from ascribe.fraud.v1 import fraud_pb2

from services.attribution.fraud_client import FraudClient
from services.common import deadlines
from services.common.ip import subscriber_key

logger = logging.getLogger(__name__)

Key = tuple[str, ...]


def address_key(ip: str) -> Key:
    return ("ip", subscriber_key(ip))


def customer_key(campaign_id: str, customer_id: str) -> Key:
    return ("customer", campaign_id, customer_id)


class GuessGuard:
    def __init__(
        self,
        fraud: FraudClient | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._fraud = fraud
        self._clock = clock
        self._max = max_entries
        self._blocked: dict[Key, float] = {}  # key -> when its window ends (monotonic)
        self._background: set[asyncio.Task[None]] = set()

    def retry_after(self, campaign_id: str, ip: str, customer_id: str) -> int | None:
        """Seconds until this address or customer may validate again; None when it may now."""
        if not self._blocked:
            return None
        now = self._clock()
        until = 0.0
        for key in self._keys(campaign_id, ip, customer_id):
            ends = self._blocked.get(key)
            if ends is None:
                continue
            if ends <= now:
                del self._blocked[key]
            else:
                until = max(until, ends)
        return math.ceil(until - now) if until else None

    async def missed(self, campaign_id: str, code: str, ip: str, customer_id: str) -> None:
        """Reports an unknown or mistyped code and learns whether its sender is now a guesser."""
        if self._fraud is None or not (ip or customer_id):
            return
        state = await self._fraud.check_code_attempt(
            fraud_pb2.CodeAttempt(campaign_id=campaign_id, coupon_code=code, ip=ip, customer_id=customer_id, missed=True)
        )
        if state is None or not state.blocked:
            return
        ends = self._clock() + max(1, state.retry_after_seconds)
        if state.address_blocked and ip:
            self._block(address_key(ip), ends)
        if state.customer_blocked and customer_id:
            self._block(customer_key(campaign_id, customer_id), ends)

    def missed_later(self, campaign_id: str, code: str, ip: str, customer_id: str) -> None:
        """``missed`` without waiting: a conversion's answer does not depend on it."""
        # It outlives the RPC, so the caller's deadline must not cut its fraud call short.
        task = asyncio.get_running_loop().create_task(
            self.missed(campaign_id, code, ip, customer_id), context=deadlines.background_context()
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)

    def _keys(self, campaign_id: str, ip: str, customer_id: str) -> list[Key]:
        keys = [address_key(ip)] if ip else []
        if customer_id:
            keys.append(customer_key(campaign_id, customer_id))
        return keys

    def _block(self, key: Key, ends: float) -> None:
        if key not in self._blocked and len(self._blocked) >= self._max:
            # The oldest tenth goes (dicts keep insertion order): a flood of
            # guessers must not grow the table without bound.
            for old in list(itertools.islice(self._blocked, self._max // 10 or 1)):
                del self._blocked[old]
        self._blocked[key] = ends
        logger.info("refusing validations for a code guesser (%s) for %.0f s", key[0], ends - self._clock())
