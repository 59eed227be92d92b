"""Alert writes survive a Redis that blinks (pure logic: a fake store, no I/O)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import Unavailable
from services.fraud import domain, engine
from services.fraud.bots import BotDetector
from services.fraud.ipintel import IpIntelHolder
from services.fraud.store import Alert, AlertKind


class BlinkingStore:
    """Fails the first ``failures`` alert writes, then keeps what it is given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.tries = 0
        self.written: list[Alert] = []

    async def add_alerts(self, alerts: Sequence[Alert]) -> list[str]:
        self.tries += 1
        if self.tries <= self.failures:
            raise Unavailable("redis is down")
        self.written.extend(alerts)
        return [str(i) for i in range(len(alerts))]


def engine_with(store: BlinkingStore, tmp_path: Path) -> engine.FraudEngine:
    fake: Any = store
    return engine.FraudEngine(domain.Rules(), fake, IpIntelHolder(tmp_path / "no-lists"), BotDetector(cache_size=1))


LEAK = Alert(kind=AlertKind.CODE_LEAK, detail="unique code X tried from 4 IPs", coupon_code="X")


async def test_an_alert_write_that_fails_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_ALERT_RETRY_PAUSES", (0.0, 0.0, 0.0))
    store = BlinkingStore(failures=2)
    await engine_with(store, tmp_path)._raise_alerts([LEAK])
    assert store.tries == 3 and store.written == [LEAK]


async def test_tries_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_ALERT_RETRY_PAUSES", (0.0, 0.0))
    store = BlinkingStore(failures=10)
    await engine_with(store, tmp_path)._raise_alerts([LEAK])
    assert store.tries == 3 and store.written == []


async def test_a_stopping_engine_tries_once_more_at_once_and_stops(tmp_path: Path) -> None:
    store = BlinkingStore(failures=10)
    fraud = engine_with(store, tmp_path)
    fraud._raise_alerts_later([LEAK])  # its first pause is 0.2 s, the next ones longer
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await fraud.close()
    assert time.monotonic() - started < 0.15 and store.tries == 2
