"""Settings of the fraud service, from the environment (fails fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.env import (
    ConfigError,
    env_float,
    env_int,
    env_optional,
    env_str,
    require_token_off_loopback,
    split_host_port,
)
from services.fraud.domain import Rules, parse_weight_overrides
from services.fraud.store import StoreConfig


def redis_url_from_env() -> str:
    url = env_optional("ASCRIBE_REDIS_URL")
    if not url:
        raise ConfigError("ASCRIBE_REDIS_URL is unset (make run starts an embedded Redis and sets it)")
    return url


@dataclass(frozen=True)
class Settings:
    redis_url: str
    addr: str = "127.0.0.1:50052"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9102
    internal_token: str | None = None
    ipintel_dir: Path = Path(".data/ipintel")
    # Redis socket timeouts bound how long a check waits on a Redis that hangs;
    # one that is down refuses at once.
    redis_timeout_ms: int = 250
    redis_max_connections: int = 64
    watch_block_ms: int = 1000
    # Single checks that arrive within this of the previous Redis round trip's
    # start share the next one (see FraudEngine).
    check_linger_ms: int = 2
    max_batch: int = 5000
    max_future_seconds: int = 300
    surge_flush_seconds: float = 10.0
    rules: Rules = field(default_factory=Rules)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __repr__(self) -> str:  # secrets (the token, a password in the URL) never reach the logs
        return (
            f"Settings(addr={self.addr!r}, metrics_port={self.metrics_port}, "
            f"ipintel_dir={str(self.ipintel_dir)!r}, key_prefix={self.store.prefix!r})"
        )

    @classmethod
    def from_env(cls) -> Settings:
        addr = env_str("ASCRIBE_FRAUD_ADDR", "127.0.0.1:50052")
        host, _ = split_host_port(addr, "ASCRIBE_FRAUD_ADDR")
        metrics_host = env_str("ASCRIBE_FRAUD_METRICS_HOST", host or "127.0.0.1")
        internal_token = env_optional("ASCRIBE_INTERNAL_TOKEN")
        require_token_off_loopback(
            internal_token,
            "ASCRIBE_INTERNAL_TOKEN",
            {"ASCRIBE_FRAUD_ADDR": host, "ASCRIBE_FRAUD_METRICS_HOST": metrics_host},
        )
        try:
            weights = parse_weight_overrides(env_str("ASCRIBE_FRAUD_WEIGHTS", ""))
        except ValueError as error:
            raise ConfigError(f"ASCRIBE_FRAUD_WEIGHTS: {error}") from None
        rules = Rules(
            review_score=env_int("ASCRIBE_FRAUD_REVIEW_SCORE", 60, minimum=1),
            reject_score=env_int("ASCRIBE_FRAUD_REJECT_SCORE", 90, minimum=1),
            clicks_per_ip_minute=env_int("ASCRIBE_FRAUD_CLICKS_PER_IP_MINUTE", 10, minimum=1),
            clicks_per_ip_hour=env_int("ASCRIBE_FRAUD_CLICKS_PER_IP_HOUR", 100, minimum=1),
            conversions_per_ip_campaign_day=env_int("ASCRIBE_FRAUD_CONVERSIONS_PER_IP_DAY", 3, minimum=1),
            ctit_reject_seconds=env_float("ASCRIBE_FRAUD_CTIT_REJECT_SECONDS", 10.0),
            ctit_risk_seconds=env_float("ASCRIBE_FRAUD_CTIT_RISK_SECONDS", 30.0),
            ctit_long_seconds=env_float("ASCRIBE_FRAUD_CTIT_LONG_HOURS", 24.0) * 3600,
            late_report_seconds=env_float("ASCRIBE_FRAUD_LATE_REPORT_HOURS", 72.0) * 3600,
            code_max_distinct=env_int("ASCRIBE_FRAUD_CODE_MAX_DISTINCT", 3, minimum=1),
        ).with_weights(weights)
        if rules.review_score > rules.reject_score:
            raise ConfigError("ASCRIBE_FRAUD_REVIEW_SCORE must not exceed ASCRIBE_FRAUD_REJECT_SCORE")
        lookback_days = env_int("ASCRIBE_FRAUD_DEDUP_TTL_DAYS", 30, minimum=1)
        store = StoreConfig(
            prefix=env_str("ASCRIBE_FRAUD_KEY_PREFIX", "ascribe"),
            dedup_ttl_seconds=lookback_days * 86400,
            code_spread_ttl_seconds=env_int("ASCRIBE_FRAUD_CODE_WINDOW_DAYS", 30, minimum=1) * 86400,
            code_max_distinct=rules.code_max_distinct,
            spike_window_seconds=env_int("ASCRIBE_FRAUD_SPIKE_WINDOW_SECONDS", 600, minimum=1),
            spike_baseline_seconds=env_int("ASCRIBE_FRAUD_SPIKE_BASELINE_HOURS", 24, minimum=1) * 3600,
            spike_min_volume=env_int("ASCRIBE_FRAUD_SPIKE_MIN_VOLUME", 20, minimum=1),
            spike_factor=env_float("ASCRIBE_FRAUD_SPIKE_FACTOR", 5.0, minimum=1.0),
            burst_window_seconds=env_int("ASCRIBE_FRAUD_BURST_WINDOW_SECONDS", 300, minimum=1),
            burst_min_volume=env_int("ASCRIBE_FRAUD_BURST_MIN_VOLUME", 200, minimum=1),
            burst_factor=env_float("ASCRIBE_FRAUD_BURST_FACTOR", 5.0, minimum=1.0),
            surge_min_volume=env_int("ASCRIBE_FRAUD_SURGE_MIN_VOLUME", 100, minimum=1),
            surge_factor=env_float("ASCRIBE_FRAUD_SURGE_FACTOR", 5.0, minimum=1.0),
            alerts_maxlen=env_int("ASCRIBE_FRAUD_ALERTS_MAXLEN", 100_000, minimum=100),
            key_buckets=env_int("ASCRIBE_FRAUD_KEY_BUCKETS", 16, minimum=1),
        )
        if store.spike_baseline_seconds <= store.spike_window_seconds:
            raise ConfigError("ASCRIBE_FRAUD_SPIKE_BASELINE_HOURS must be longer than the spike window")
        return cls(
            redis_url=redis_url_from_env(),
            addr=addr,
            metrics_host=metrics_host,
            metrics_port=env_int("ASCRIBE_FRAUD_METRICS_PORT", 9102),
            internal_token=internal_token,
            ipintel_dir=Path(env_str("ASCRIBE_IPINTEL_DIR", ".data/ipintel")),
            redis_timeout_ms=env_int("ASCRIBE_FRAUD_REDIS_TIMEOUT_MS", 250, minimum=1),
            redis_max_connections=env_int("ASCRIBE_FRAUD_REDIS_MAX_CONNECTIONS", 64, minimum=1),
            watch_block_ms=env_int("ASCRIBE_FRAUD_WATCH_BLOCK_MS", 1000, minimum=10),
            check_linger_ms=env_int("ASCRIBE_FRAUD_CHECK_LINGER_MS", 2, minimum=0),
            max_batch=env_int("ASCRIBE_FRAUD_MAX_BATCH", 5000, minimum=1),
            max_future_seconds=env_int("ASCRIBE_FRAUD_MAX_FUTURE_SECONDS", 300),
            rules=rules,
            store=store,
        )
