"""Prometheus metrics of the fraud service (module-level, low-cardinality labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SIGNALS_TOTAL = Counter(
    "ascribe_fraud_signals_total",
    "Fraud signals raised, by signal code.",
    ["code"],
)
VERDICTS_TOTAL = Counter(
    "ascribe_fraud_verdicts_total",
    "Verdicts given, by event kind (click, conversion) and action.",
    ["event", "action"],
)
CHECK_SECONDS = Histogram(
    "ascribe_fraud_check_seconds",
    "Time to check one call's events (a single check or a whole batch), Redis included.",
    ["event", "mode"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH_SIZE = Histogram(
    "ascribe_fraud_batch_size",
    "Events per batch RPC.",
    ["event"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
COALESCED_CHECKS = Histogram(
    "ascribe_fraud_coalesced_checks",
    "Single checks (CheckClick, CheckConversion) that shared one Redis round trip.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ALERTS_TOTAL = Counter(
    "ascribe_fraud_alerts_total",
    "Alerts written to the alert stream, by kind.",
    ["kind"],
)
REDIS_ERRORS_TOTAL = Counter(
    "ascribe_fraud_redis_errors_total",
    "Checks that failed because Redis was unavailable.",
)
IPINTEL_ENTRIES = Gauge(
    "ascribe_fraud_ipintel_entries",
    "Entries loaded per IP list (0: the list is missing and its signal off).",
    ["list"],
)
IPINTEL_RELOADS_TOTAL = Counter(
    "ascribe_fraud_ipintel_reloads_total",
    "Reloads of the IP lists (SIGHUP or a scheduled refresh).",
)
IPINTEL_AGE_SECONDS = Gauge(
    "ascribe_fraud_ipintel_age_seconds",
    "Age of each loaded IP list: now minus the time it was current (its as_of); +Inf when it is missing.",
    ["list"],
)
IPINTEL_REFRESHES_TOTAL = Counter(
    "ascribe_fraud_ipintel_refreshes_total",
    "Scheduled downloads of the IP lists (ASCRIBE_IPINTEL_REFRESH_HOURS), by result (ok, failed).",
    ["result"],
)
REDIS_USED_MEMORY_BYTES = Gauge(
    "ascribe_fraud_redis_used_memory_bytes",
    "Redis's used_memory (INFO memory); on a cluster, the node nearest its maxmemory.",
)
REDIS_MAXMEMORY_BYTES = Gauge(
    "ascribe_fraud_redis_maxmemory_bytes",
    "Redis's maxmemory (0: unbounded); on a cluster, that of the node nearest it.",
)
