"""Helpers the integration tests share: in-process services, error details and metric samples."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from ascribe.fraud.v1 import fraud_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.registry import Collector

from services.attribution.config import Settings


def ts(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def signal_codes(verdict: fraud_pb2.Verdict) -> set[str]:
    """The codes of a fraud verdict's signals."""
    return {s.code for s in verdict.signals}


# Measurements tests want a reader to see whether they pass (titled lines),
# printed at the end of the run by tests/conftest.py's terminal summary.
TEST_REPORTS: dict[str, list[str]] = {}


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def attribution_settings(database_url: str, fraud_addr: str, **overrides: Any) -> Settings:
    settings = Settings(
        database_url=database_url,
        addr="127.0.0.1:0",
        fraud_addr=fraud_addr,
        metrics_host="127.0.0.1",
        metrics_port=0,
        admin_token=None,
        internal_token=None,
        fraud_deadline_ms=2000,  # in-process services share one event loop with the test
        db_pool_min=2,
        db_pool_max=20,
        db_statement_timeout_ms=10000,
        background_jobs=False,
        auto_hold_leaked_codes=False,
        catalog_cache_ms=0,
    )
    return replace(settings, **overrides)


def fraud_settings(redis_url: str, redis_prefix: str, ipintel_dir: Path, port: int = 0) -> Any:
    from services.fraud.config import Settings as FraudSettings
    from services.fraud.store import StoreConfig

    return FraudSettings(
        redis_url=redis_url,
        addr=f"127.0.0.1:{port}",
        metrics_port=0,
        ipintel_dir=ipintel_dir,
        store=StoreConfig(prefix=redis_prefix),
    )


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields.extend(violation.field for violation in bad_request.field_violations)
    return fields


def sample(
    metric: Collector, suffix: str | None = None, *, family: str | None = None, **labels: str
) -> float | None:
    """A value read from one of our metric objects, never from the global registry by name.

    ``suffix`` picks the series: by default a counter's ``_total`` or a
    gauge's value; a histogram's ``_count`` or ``_sum`` must be named.
    ``family`` picks one of the metrics a collector yields several of.
    ``labels`` match as in ``get_sample_value``, except that a partial set
    adds up every series that carries it (none: the metric's total). None
    when no series matches, as for a label set never used yet.
    """
    collected = list(metric.collect())
    matching = [found for found in collected if family in (None, found.name)]
    if len(matching) != 1:
        raise ValueError(f"name one of {[found.name for found in collected]} as family")
    (chosen,) = matching
    if suffix is None and chosen.type not in ("counter", "gauge"):
        raise ValueError(f"{chosen.name} is a {chosen.type}: name its series (_count, _sum)")
    name = chosen.name + (suffix if suffix is not None else "_total" if chosen.type == "counter" else "")
    value: float | None = None
    for series in chosen.samples:
        if series.name == name and labels.items() <= series.labels.items():
            value = (value or 0.0) + series.value
    return value


@dataclass
class Clock:
    """An injectable clock: tests move time instead of sleeping."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    @classmethod
    def real(cls) -> Clock:
        return cls(datetime.now(UTC))
