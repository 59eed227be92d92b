"""Every Prometheus metric of the attribution service, in one place."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import asyncpg
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.attribution.common.models import Conversion

# ---------------------------------------------------------------- clicks

CLICKS_TOTAL = Counter(
    "ascribe_clicks_total",
    "Clicks recorded (committed), by decision.",
    ["decision"],
)
CLICK_RECORD_SECONDS = Histogram(
    "ascribe_click_record_seconds",
    "Time to judge and commit one RecordClick (or one RecordClickBatch).",
    ["rpc"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CLICK_FLUSH_ROWS = Histogram(
    "ascribe_click_flush_rows",
    "Click rows written by one group commit (one INSERT).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
CLICK_FLUSH_SECONDS = Histogram(
    "ascribe_click_flush_seconds",
    "Time of one group commit of click rows.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
CLICK_FLUSH_FAILURES_TOTAL = Counter(
    "ascribe_click_flush_failures_total",
    "Group commits of click rows that failed (their clicks answered UNAVAILABLE).",
)

# ---------------------------------------------------------------- catalog cache

CATALOG_LOOKUPS_TOTAL = Counter(
    "ascribe_catalog_lookups_total",
    "Catalog queries the hot paths' cache sent to PostgreSQL (its misses), by record kind.",
    ["kind"],
)

# ---------------------------------------------------------------- fraud client

FRAUD_AVAILABLE = Gauge(
    "ascribe_fraud_available",
    "1 when the last batched call to the fraud service succeeded, 0 when it failed.",
)
FRAUD_UNAVAILABLE_TOTAL = Counter(
    "ascribe_fraud_unavailable",  # exposed as ascribe_fraud_unavailable_total
    "Events that got no fraud verdict in time (recorded FLAGGED, fraud_unavailable).",
    ["kind"],
)

# ---------------------------------------------------------------- conversions

CONVERSIONS_TOTAL = Counter(
    "ascribe_conversions_total", "Conversions judged, by resulting status.", ["status"]
)
# Money of judged conversions, in the currency's major unit (49.90, not
# micros: what a dashboard shows). Rejected conversions are left out: their
# currency is whatever the shop sent, an unbounded label; every other one
# carries its campaign's currency. Counted at judgment: later approvals and
# refunds show in the lifecycle counters, not here.
CONVERSION_REVENUE_TOTAL = Counter(
    "ascribe_conversion_revenue_total",
    "Order amounts (after discount) of judged, not rejected conversions, by status and currency.",
    ["status", "currency"],
)
CONVERSION_PAYOUT_TOTAL = Counter(
    "ascribe_conversion_payout_total",
    "Affiliate payouts of judged, not rejected conversions, by status and currency.",
    ["status", "currency"],
)
CONVERSION_BATCH_SIZE = Histogram(
    "ascribe_conversion_batch_size",
    "Conversions judged and committed in one transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
CONVERSION_SECONDS = Histogram(
    "ascribe_conversion_seconds",
    "Time from a postback reaching the attribution service to its commit.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# ---------------------------------------------------------------- lifecycle

APPROVED_TOTAL = Counter("ascribe_conversions_approved_total", "Conversions approved when their hold passed.")
APPROVAL_LAG_SECONDS = Gauge(
    "ascribe_approval_lag_seconds", "Age of the oldest PENDING conversion whose hold has passed."
)
RESCORED_TOTAL = Counter("ascribe_conversions_rescored_total", "Re-scored conversions, by outcome.", ["outcome"])
REVERSED_TOTAL = Counter("ascribe_conversion_refunds_total", "Refunds applied, by kind.", ["kind"])
LEAK_HOLDS_TOTAL = Counter("ascribe_leak_holds_total", "UNIQUE codes put on HOLD after a CODE_LEAK alert.")

# ---------------------------------------------------------------- reports (issue #14)

REPORT_COMPACTION_SECONDS = Histogram(
    "ascribe_report_compaction_seconds",
    "Time of one pass of the report compaction (the rollups' folds and the day blocks) that ended,"
    " on the replica that ran it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0),
)
REPORT_COMPACTION_FAILURES_TOTAL = Counter(
    "ascribe_report_compaction_failures",  # exposed as ascribe_report_compaction_failures_total
    "Passes of the report compaction that failed (rolled back: a timeout, PostgreSQL unreachable).",
)
REPORT_BLOCKS_BUILT = Gauge(
    "ascribe_report_blocks_built",
    "1 when reports read the day blocks; 0 while their first pass (or a rebuild) walks the fine tier,"
    " or while the watermark is ahead of the snapshots (a restore), when reports read no block.",
)

# ---------------------------------------------------------------- webhooks (issue #18)

WEBHOOK_ATTEMPTS_TOTAL = Counter(
    "ascribe_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retry, dead, refused).",
    ["outcome"],
)
WEBHOOK_DEAD_TOTAL = Counter(
    "ascribe_webhook_deliveries_dead_total",
    "Webhook deliveries that died (refused by the receiver, a forbidden address, or out of retries).",
)
WEBHOOK_EVENTS_TOTAL = Counter(
    "ascribe_webhook_events_total", "Outbox events fanned out to webhook deliveries."
)
WEBHOOK_DELIVERY_LAG_SECONDS = Gauge(
    "ascribe_webhook_delivery_lag_seconds",
    "How late the most overdue pending webhook delivery is (0: none waits past its time).",
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "ascribe_webhook_attempt_seconds",
    "Time of one webhook delivery attempt (connect, send, read up to 64 KB).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def count_judged(conversions: Iterable[Conversion]) -> None:
    """Counts committed judgments: how many, and their money unless rejected."""
    for conversion in conversions:
        CONVERSIONS_TOTAL.labels(conversion.status).inc()
        if conversion.status != "rejected":
            currency = conversion.currency.upper()
            CONVERSION_REVENUE_TOTAL.labels(conversion.status, currency).inc(conversion.amount_micros / 1e6)
            CONVERSION_PAYOUT_TOTAL.labels(conversion.status, currency).inc(conversion.payout_micros / 1e6)


# ---------------------------------------------------------------- PostgreSQL pool


class PoolCollector(Collector):
    """The connection pools' size, use and queue, read at scrape time.

    Nothing is counted on the hot path: acquire and release stay as asyncpg
    makes them. Closed pools are dropped at the next scrape (asyncpg's Pool
    has slots and no weak references), so tests that start many services in
    one process report only the live ones, summed.
    """

    def __init__(self) -> None:
        self._pools: list[asyncpg.Pool] = []

    def watch(self, pool: asyncpg.Pool) -> None:
        self._pools.append(pool)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = in_use = waiting = maximum = 0
        # A new list, not in place: the scrape runs in the metrics thread.
        self._pools = [pool for pool in self._pools if not pool.is_closing()]
        for pool in self._pools:
            open_now = pool.get_size()
            size += open_now
            in_use += open_now - pool.get_idle_size()
            maximum += pool.get_max_size()
            waiting += _waiters(pool)
        yield GaugeMetricFamily(
            "ascribe_db_pool_connections", "PostgreSQL connections the pool holds open.", value=size
        )
        yield GaugeMetricFamily(
            "ascribe_db_pool_max_connections", "The most connections the pool may open.", value=maximum
        )
        yield GaugeMetricFamily(
            "ascribe_db_pool_connections_in_use", "Pool connections lent out right now.", value=in_use
        )
        yield GaugeMetricFamily(
            "ascribe_db_pool_waiting_acquires",
            "Callers waiting for a pool connection (all of them lent out).",
            value=waiting,
        )


def _waiters(pool: asyncpg.Pool) -> int:
    """Acquirers blocked on the pool's free-connection queue.

    asyncpg has no public count of them; its queue is an asyncio.Queue whose
    ``_getters`` are exactly the blocked ``get()`` calls. Should a release
    rename it, the gauge reads 0 rather than breaking the scrape.
    """
    getters: Sequence[object] = getattr(getattr(pool, "_queue", None), "_getters", ())
    return sum(1 for getter in getters if not getattr(getter, "done", lambda: True)())


POOLS = PoolCollector()
REGISTRY.register(POOLS)
