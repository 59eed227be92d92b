"""Every Prometheus metric of the attribution service, in one place."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
