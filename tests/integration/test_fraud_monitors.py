"""The fraud service's monitors on a real Redis: AFFILIATE_BURST and RULE_SURGE
alerts served by WatchAlerts, and the Prometheus metrics of the checks.

Both detectors compare a short window with the subject's own usual rate (the
baseline window, a day by default), on the events' own timestamps for bursts
and on the flush time for surges. A usual rate therefore takes a day of
history: the tests write it through the store with explicit timestamps (the
detector's own API), then send the decisive window through gRPC and read the
alerts the service wrote, as a watcher would. The thresholds are the shipped
defaults unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc

from services.fraud.config import Settings
from services.fraud.domain import ClickEvent
from services.fraud.ipintel import IpIntelHolder
from services.fraud.metrics import ALERTS_TOTAL, CHECK_SECONDS, SIGNALS_TOTAL, VERDICTS_TOTAL
from services.fraud.server import FraudService, start_fraud
from services.fraud.store import Alert, FraudStore, StoreConfig
from tests.support import sample, signal_codes, ts

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
CURL = "curl/8.4.0"
CAMPAIGN = "camp"
CLEAN_IP = "81.2.69.142"
DEFAULTS = StoreConfig()
BURST, SURGE = pb.ALERT_KIND_AFFILIATE_BURST, pb.ALERT_KIND_RULE_SURGE
ALLOW, REVIEW, REJECT = pb.VERDICT_ACTION_ALLOW, pb.VERDICT_ACTION_REVIEW, pb.VERDICT_ACTION_REJECT
# Two days of history give the day-long baseline window one full day behind it.
FULL_HISTORY = timedelta(days=2)


def clean_ip(n: int, net: int = 160) -> str:
    """The n-th of many distinct clean addresses (no list has them; no IP exceeds its velocity)."""
    return f"86.{net + n // 62500}.{n // 250 % 250}.{n % 250 + 1}"


def click(n: int, affiliate: str, at: datetime, **fields: object) -> pb.CheckClickRequest:
    values: dict[str, object] = {
        "click_id": f"{affiliate}-{n}", "campaign_id": CAMPAIGN, "affiliate_id": affiliate,
        "ip": clean_ip(n), "user_agent": BROWSER, "occurred_at": ts(at),
    }
    values.update(fields)
    return pb.CheckClickRequest(**values)  # type: ignore[arg-type]


@dataclass
class Fraud:
    service: FraudService
    stub: fraud_pb2_grpc.FraudServiceAsyncStub

    @property
    def store(self) -> FraudStore:
        return self.service.engine.store

    async def clicks(self, requests: list[pb.CheckClickRequest]) -> list[pb.Verdict]:
        answer = await self.stub.CheckClickBatch(pb.CheckClickBatchRequest(requests=requests))
        return list(answer.verdicts)

    async def alerts(self, seconds: float = 1.0, after_id: str = "0") -> list[pb.Alert]:
        """Every alert WatchAlerts serves after ``after_id`` within ``seconds``.

        Alerts are written in the background after the verdicts; reading for a
        while (not up to a count) also catches one that should not be there.
        """
        alerts: list[pb.Alert] = []
        call = self.stub.WatchAlerts(pb.WatchAlertsRequest(after_id=after_id), timeout=seconds)
        try:
            async for alert in call:
                alerts.append(alert)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return alerts

    async def first_alert(self, kind: int, timeout: float) -> pb.Alert:
        call = self.stub.WatchAlerts(pb.WatchAlertsRequest(after_id="0"), timeout=timeout)
        async for alert in call:
            if alert.kind == kind:
                call.cancel()
                return alert
        raise AssertionError("the alert stream ended")


StartFraud = Callable[..., Awaitable[Fraud]]


@pytest.fixture
async def start(
    redis_server_url: str,
    redis_prefix: str,
    ipintel_dir: Path,
    redis_client: aioredis.Redis,  # its teardown drops the test's keys
    shared_intel: IpIntelHolder,
) -> AsyncIterator[StartFraud]:
    """Starts the service in-process with store overrides; stops it after the test."""
    running: list[tuple[FraudService, grpc.aio.Channel]] = []

    async def start_one(surge_flush_seconds: float = 3600.0, **store: object) -> Fraud:
        settings = Settings(
            redis_url=redis_server_url,
            addr="127.0.0.1:0",
            metrics_port=0,
            ipintel_dir=ipintel_dir,
            watch_block_ms=200,
            # An hour: the tests flush by hand unless they test the monitor.
            surge_flush_seconds=surge_flush_seconds,
            store=StoreConfig(prefix=redis_prefix, **store),  # type: ignore[arg-type]
        )
        service = await start_fraud(settings, handle_sighup=False, intel=shared_intel)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        running.append((service, channel))
        return Fraud(service, fraud_pb2_grpc.FraudServiceStub(channel))

    yield start_one
    for service, channel in running:
        await channel.close()
        await service.stop(grace_seconds=0.5)


@pytest.fixture(scope="module")
def tor_ips(ipintel_dir: Path, shared_intel: IpIntelHolder) -> list[str]:
    """IPv4 Tor exits of the shipped list that no other list names (their only signal is tor_exit)."""
    lines = (ipintel_dir / "tor-exit-nodes.txt").read_text().split()
    ips = []
    for ip in lines:
        info = shared_intel.current.lookup(ip)
        if ":" not in ip and info.tor and not info.vpn:
            ips.append(ip)
    assert len(ips) >= 300, "the Tor list is too short for these tests"
    return ips


# ---------------------------------------------------------------- history


async def click_history(
    store: FraudStore, affiliates: list[str], per_window: int, span: timedelta, end: datetime, batches: int = 3
) -> list[Alert]:
    """``per_window`` clicks per burst window for each affiliate over ``span`` before ``end``,
    in ``batches`` evenly spaced batches per window; the alerts the counting raised."""
    step = DEFAULTS.burst_window_seconds / batches
    size = per_window // batches
    raised: list[Alert] = []
    for k in range(int(span.total_seconds() / step), 0, -1):
        at = end - timedelta(seconds=k * step)
        events = [
            ClickEvent(
                click_id=f"h-{affiliate}-{k}-{i}", external_click_id="", campaign_id=CAMPAIGN,
                affiliate_id=affiliate, coupon_code="", ip="", user_agent=BROWSER, occurred_at=at,
            )
            for affiliate in affiliates
            for i in range(size)
        ]
        _, alerts = await store.count_clicks(events)
        raised.extend(alerts)
    return raised


async def signal_history(
    store: FraudStore, per_window: dict[str, int], span: timedelta, end: datetime, flushes: int = 3
) -> list[Alert]:
    """Signal counts as the flushes of ``flushes`` per surge window over ``span`` before ``end``
    would have fed them; the alerts the counting raised."""
    step = DEFAULTS.surge_window_seconds / flushes
    counts = {code: count // flushes for code, count in per_window.items()}
    raised: list[Alert] = []
    for k in range(int(span.total_seconds() / step), 0, -1):
        raised.extend(await store.count_signals(counts, end - timedelta(seconds=k * step)))
    return raised


async def bot_clicks(fraud: Fraud, count: int, first: int = 0) -> None:
    verdicts = await fraud.clicks(
        # No affiliate: so many clicks would be an affiliate's burst as well.
        [click(first + n, "bots", datetime.now(UTC), affiliate_id="", user_agent=CURL, ip=clean_ip(first + n, 170))
         for n in range(count)]
    )
    assert all(signal_codes(v) == {"bot_user_agent"} for v in verdicts)


async def tor_clicks(fraud: Fraud, ips: list[str]) -> None:
    verdicts = await fraud.clicks(
        [click(n, "tor", datetime.now(UTC), affiliate_id="", ip=ip) for n, ip in enumerate(ips)]
    )
    assert all(signal_codes(v) == {"tor_exit"} for v in verdicts)


# ---------------------------------------------------------------- AFFILIATE_BURST


async def test_affiliate_burst_alerts_once_naming_the_affiliate(start: StartFraud) -> None:
    fraud = await start()
    now = datetime.now(UTC)
    # Both affiliates usually send 20 clicks per 5 minutes, one batch a window.
    assert await click_history(fraud.store, ["aff-burst", "aff-calm"], 20, FULL_HISTORY, now, batches=1) == []
    alerts_before = sample(ALERTS_TOTAL, kind="affiliate_burst") or 0.0

    # The burst's clicks share one timestamp, so the window holds exactly what
    # was sent plus what is left of the previous window (at most its 20).
    below = DEFAULTS.burst_min_volume - 20 - 1
    for n in range(below):
        await fraud.stub.CheckClick(click(n, "aff-burst", now))
    for n in range(20):  # the calm affiliate's usual share of the same window
        await fraud.stub.CheckClick(click(n, "aff-calm", now))
    assert await fraud.alerts() == [], "an alert below the burst's minimum volume"

    for n in range(below, DEFAULTS.burst_min_volume):
        await fraud.stub.CheckClick(click(n, "aff-burst", now))
    alerts = await fraud.alerts()
    assert [(a.kind, a.affiliate_id, a.campaign_id) for a in alerts] == [(BURST, "aff-burst", CAMPAIGN)]
    assert "aff-burst" in alerts[0].detail
    assert alerts[0].at.ToDatetime(tzinfo=UTC) > now - timedelta(minutes=1)

    # The burst goes on, singly and in batches: still the one alert.
    for n in range(DEFAULTS.burst_min_volume, DEFAULTS.burst_min_volume + 50):
        await fraud.stub.CheckClick(click(n, "aff-burst", now))
    await fraud.clicks([click(1000 + n, "aff-burst", now) for n in range(300)])
    assert await fraud.alerts(after_id=alerts[0].id) == [], "more than one alert for one burst"
    assert (sample(ALERTS_TOTAL, kind="affiliate_burst") or 0.0) - alerts_before == 1


async def test_a_burst_after_the_episode_alerts_again(start: StartFraud) -> None:
    # A one-second window: one episode (the alert flag) lasts six windows.
    fraud = await start(burst_window_seconds=1, burst_baseline_seconds=60, burst_min_volume=20)
    first = datetime.now(UTC) - timedelta(seconds=3)
    await fraud.clicks([click(n, "aff-burst", first) for n in range(20)])
    # The burst spills into the following windows: the same episode.
    await fraud.clicks([click(100 + n, "aff-burst", first + timedelta(seconds=2)) for n in range(20)])
    alerts = await fraud.alerts()
    assert [(a.kind, a.affiliate_id) for a in alerts] == [(BURST, "aff-burst")]

    await asyncio.sleep(6 * 1 + 0.5)  # the episode is over
    # The two bursts are now this affiliate's history (about 40 clicks over
    # eight windows, ~5 a window): a new burst must be five times that.
    await fraud.clicks([click(200 + n, "aff-burst", datetime.now(UTC)) for n in range(60)])
    again = await fraud.alerts(after_id=alerts[0].id)
    assert [(a.kind, a.affiliate_id) for a in again] == [(BURST, "aff-burst")]


@pytest.mark.parametrize("history", [FULL_HISTORY, timedelta(hours=2)], ids=["2-days", "2-hours"])
async def test_an_affiliate_near_its_usual_rate_raises_no_burst(start: StartFraud, history: timedelta) -> None:
    """120 clicks per 5 minutes, then 220: under twice the usual rate, far from five times.

    The history alone stays below the burst's minimum volume (200), so only
    the last window can raise; how long the affiliate has been at its rate
    must not turn its usual traffic into a burst.
    """
    fraud = await start()
    now = datetime.now(UTC)
    assert await click_history(fraud.store, ["aff-steady"], 120, history, now) == []
    verdicts = await fraud.clicks([click(n, "aff-steady", now) for n in range(220)])
    assert all(v.action == ALLOW for v in verdicts)
    assert [a.detail for a in await fraud.alerts() if a.kind == BURST] == []


async def test_a_rate_counted_before_first_seen_times_is_no_cold_start(start: StartFraud) -> None:
    """Rates written by a version that kept no first-seen time must not all look brand new after an upgrade."""
    fraud = await start()
    now = datetime.now(UTC)
    assert await click_history(fraud.store, ["aff-old"], 120, FULL_HISTORY, now) == []
    client = fraud.store.client
    rates = [key async for key in client.scan_iter(match=f"{fraud.store.prefix}:*aff:{CAMPAIGN}:aff-old:rate")]
    assert len(rates) == 1 and await client.hdel(rates[0], "first") == 1
    verdicts = await fraud.clicks([click(n, "aff-old", now) for n in range(220)])
    assert all(v.action == ALLOW for v in verdicts)
    assert [a.detail for a in await fraud.alerts() if a.kind == BURST] == []


# ---------------------------------------------------------------- RULE_SURGE


async def test_rule_surge_alerts_once_naming_the_rule(start: StartFraud, tor_ips: list[str]) -> None:
    fraud = await start()
    now = datetime.now(UTC)
    # bot_user_agent usually fires 12 times per 5 minutes, tor_exit 60 times.
    usual = {"bot_user_agent": 12, "tor_exit": 60}
    assert await signal_history(fraud.store, usual, FULL_HISTORY, now) == []
    surges_before = sample(ALERTS_TOTAL, kind="rule_surge") or 0.0

    await bot_clicks(fraud, 150)  # more than 5 times usual, and above the minimum of 100
    await tor_clicks(fraud, tor_ips[:120])  # twice usual: not a surge
    assert await fraud.alerts() == [], "a surge alert before the flush"
    await fraud.service.engine.flush_signal_counts()
    alerts = await fraud.alerts()
    assert [a.kind for a in alerts] == [SURGE]
    assert "bot_user_agent" in alerts[0].detail and "tor_exit" not in alerts[0].detail
    assert (sample(ALERTS_TOTAL, kind="rule_surge") or 0.0) - surges_before == 1

    # The next period surges as well: the same episode, no second alert.
    await bot_clicks(fraud, 150, first=150)
    await fraud.service.engine.flush_signal_counts()
    assert await fraud.alerts(after_id=alerts[0].id) == [], "more than one alert for one surge"


async def test_the_surge_monitor_flushes_by_itself(start: StartFraud) -> None:
    fraud = await start(surge_flush_seconds=0.2)
    assert await signal_history(fraud.store, {"bot_user_agent": 12}, FULL_HISTORY, datetime.now(UTC)) == []
    await bot_clicks(fraud, 150)
    alert = await fraud.first_alert(SURGE, timeout=5)
    assert "bot_user_agent" in alert.detail


@pytest.mark.parametrize("history", [FULL_HISTORY, timedelta(hours=2)], ids=["2-days", "2-hours"])
async def test_a_rule_near_its_usual_rate_raises_no_surge(
    start: StartFraud, tor_ips: list[str], history: timedelta
) -> None:
    """tor_exit fires 60 times per 5 minutes, then 120: twice the usual, far from five times.

    The history alone stays below the surge's minimum volume (100).
    """
    fraud = await start()
    assert await signal_history(fraud.store, {"tor_exit": 60}, history, datetime.now(UTC)) == []
    await tor_clicks(fraud, tor_ips[:120])
    await fraud.service.engine.flush_signal_counts()
    assert [a.detail for a in await fraud.alerts() if a.kind == SURGE] == []


# ---------------------------------------------------------------- metrics


async def test_checks_move_the_signal_verdict_and_latency_metrics(start: StartFraud, tor_ips: list[str]) -> None:
    fraud = await start()
    now = datetime.now(UTC)
    counted_codes = ("bot_user_agent", "tor_exit", "datacenter_ip", "vpn_ip", "ctit_short", "late_report")
    verdict_labels = [(event, action) for event in ("click", "conversion") for action in ("allow", "review", "reject")]
    timings = [(event, mode) for event in ("click", "conversion") for mode in ("single", "batch")]

    def read() -> dict[str, float]:
        values = {f"signal {code}": sample(SIGNALS_TOTAL, code=code) or 0.0 for code in counted_codes}
        for event, action in verdict_labels:
            values[f"verdict {event} {action}"] = sample(VERDICTS_TOTAL, event=event, action=action) or 0.0
        for event, mode in timings:
            values[f"checks {event} {mode}"] = sample(CHECK_SECONDS, "_count", event=event, mode=mode) or 0.0
            values[f"seconds {event} {mode}"] = sample(CHECK_SECONDS, "_sum", event=event, mode=mode) or 0.0
        return values

    before = read()
    bot = await fraud.stub.CheckClick(click(1, "aff", now, user_agent=CURL))
    tor = await fraud.stub.CheckClick(click(2, "aff", now, ip=tor_ips[0]))
    clean = await fraud.stub.CheckClick(click(3, "aff", now, ip=CLEAN_IP))
    # Clicked 20 s before an order reported 4 days late: 40 + 30 points, review.
    occurred = now - timedelta(days=4)
    late = await fraud.stub.CheckConversion(
        pb.CheckConversionRequest(
            order_id="o-1", campaign_id=CAMPAIGN, affiliate_id="aff", click_id="aff-3",
            click_time=ts(occurred - timedelta(seconds=20)), ip=CLEAN_IP, user_agent=BROWSER,
            occurred_at=ts(occurred), received_at=ts(now),
        )
    )
    batch = await fraud.clicks(
        [click(4, "aff", now, user_agent=CURL), click(5, "aff", now, user_agent=CURL),
         click(6, "aff", now, ip=tor_ips[1]), click(7, "aff", now)]
    )
    assert (bot.action, signal_codes(bot)) == (REJECT, {"bot_user_agent"})
    assert (tor.action, signal_codes(tor)) == (REJECT, {"tor_exit"})
    assert (clean.action, signal_codes(clean)) == (ALLOW, set())
    assert (late.action, signal_codes(late)) == (REVIEW, {"ctit_short", "late_report"})
    assert [(v.action, signal_codes(v)) for v in batch] == [
        (REJECT, {"bot_user_agent"}), (REJECT, {"bot_user_agent"}), (REJECT, {"tor_exit"}), (ALLOW, set())
    ]

    after = read()
    moved = {name: after[name] - before[name] for name in before if not name.startswith("seconds")}
    assert moved == {
        "signal bot_user_agent": 3, "signal tor_exit": 2, "signal datacenter_ip": 0, "signal vpn_ip": 0,
        "signal ctit_short": 1, "signal late_report": 1,
        "verdict click allow": 2, "verdict click review": 0, "verdict click reject": 5,
        "verdict conversion allow": 0, "verdict conversion review": 1, "verdict conversion reject": 0,
        "checks click single": 3, "checks click batch": 1,
        "checks conversion single": 1, "checks conversion batch": 0,
    }
    for event, mode in [("click", "single"), ("click", "batch"), ("conversion", "single")]:
        assert after[f"seconds {event} {mode}"] > before[f"seconds {event} {mode}"], (event, mode)
