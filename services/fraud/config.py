"""Settings of the fraud service, from the environment (fails fast)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.channels import Transport
from services.common.env import (
    ConfigError,
    env_bool,
    env_float,
    env_int,
    env_optional,
    env_str,
    health_addr_from_env,
    require_token_off_loopback,
    split_host_port,
)
from services.fraud.domain import Rules, parse_weight_overrides
from services.fraud.ipintel_download import SOURCES, Source
from services.fraud.store import StoreConfig

# The upstream lists change a few times a day at most; refreshing more often
# only loads their servers (and every replica refreshes on its own).
MIN_IPINTEL_REFRESH_HOURS = 1.0


def redis_url_from_env() -> str:
    url = env_optional("ASCRIBE_REDIS_URL")
    if not url:
        raise ConfigError("ASCRIBE_REDIS_URL is unset (make run starts an embedded Redis and sets it)")
    return url


def ipintel_from_env() -> dict[str, Any]:
    """The IP list settings: where they are read, where a refresh writes, how often it runs."""
    refresh_hours = env_float("ASCRIBE_IPINTEL_REFRESH_HOURS", 0.0)
    if not math.isfinite(refresh_hours) or 0 < refresh_hours < MIN_IPINTEL_REFRESH_HOURS:
        raise ConfigError(
            f"ASCRIBE_IPINTEL_REFRESH_HOURS must be 0 (off) or at least {MIN_IPINTEL_REFRESH_HOURS:g}, "
            f"got {refresh_hours:g}"
        )
    configured = env_optional("ASCRIBE_IPINTEL_DIR")
    return {
        "ipintel_dir": Path(configured) if configured else None,
        "ipintel_download_dir": Path(env_str("ASCRIBE_DATA_DIR", ".data")) / "ipintel",
        "ipintel_refresh_seconds": refresh_hours * 3600,
    }


@dataclass(frozen=True)
class Settings:
    redis_url: str
    addr: str = "127.0.0.1:50052"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9102
    internal_token: str | None = None
    # ASCRIBE_IPINTEL_DIR; None chooses between ipintel_download_dir and the
    # repository's snapshot on every load (services/fraud/ipintel.py).
    ipintel_dir: Path | None = None
    ipintel_download_dir: Path = Path(".data/ipintel")
    # 0: no scheduled refresh (no outbound traffic unless asked for; SIGHUP
    # still reloads what `make ipintel` wrote).
    ipintel_refresh_seconds: float = 0.0
    # Where a refresh downloads from (the upstream lists; tests serve their own).
    ipintel_sources: tuple[Source, ...] = SOURCES
    # Redis socket timeouts bound how long a check waits on a Redis that hangs;
    # one that is down refuses at once.
    redis_timeout_ms: int = 250
    redis_max_connections: int = 64
    # ASCRIBE_REDIS_URL names one node of a Redis Cluster: the client learns
    # the others and routes each bucket's script call to the shard owning it.
    redis_cluster: bool = False
    watch_block_ms: int = 1000
    # Single checks that arrive within this of the previous Redis round trip's
    # start share the next one (see FraudEngine).
    check_linger_ms: int = 2
    max_batch: int = 5000
    max_future_seconds: int = 300
    surge_flush_seconds: float = 10.0
    rules: Rules = field(default_factory=Rules)
    store: StoreConfig = field(default_factory=StoreConfig)
    transport: Transport = field(default_factory=Transport)
    # A plaintext port answering only grpc.health.v1.Health (probes, under TLS).
    health_addr: str | None = None
    # Under mutual TLS, the client certificate identities (SAN DNS names, else
    # the CN) that may call FraudService; empty: any certificate of the CA.
    allowed_clients: frozenset[str] = frozenset()

    def __repr__(self) -> str:  # secrets (the token, a password in the URL) never reach the logs
        return (
            f"Settings(addr={self.addr!r}, metrics_port={self.metrics_port}, "
            f"ipintel_dir={str(self.ipintel_dir or 'auto')!r}, key_prefix={self.store.prefix!r})"
        )

    @classmethod
    def from_env(cls) -> Settings:
        addr = env_str("ASCRIBE_FRAUD_ADDR", cls.addr)
        host, _ = split_host_port(addr, "ASCRIBE_FRAUD_ADDR")
        metrics_host = env_str("ASCRIBE_FRAUD_METRICS_HOST", host or cls.metrics_host)
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
            review_score=env_int("ASCRIBE_FRAUD_REVIEW_SCORE", Rules.review_score, minimum=1),
            reject_score=env_int("ASCRIBE_FRAUD_REJECT_SCORE", Rules.reject_score, minimum=1),
            clicks_per_ip_minute=env_int(
                "ASCRIBE_FRAUD_CLICKS_PER_IP_MINUTE", Rules.clicks_per_ip_minute, minimum=1
            ),
            clicks_per_ip_hour=env_int(
                "ASCRIBE_FRAUD_CLICKS_PER_IP_HOUR", Rules.clicks_per_ip_hour, minimum=1
            ),
            conversions_per_ip_campaign_day=env_int(
                "ASCRIBE_FRAUD_CONVERSIONS_PER_IP_DAY", Rules.conversions_per_ip_campaign_day, minimum=1
            ),
            ctit_reject_seconds=env_float("ASCRIBE_FRAUD_CTIT_REJECT_SECONDS", Rules.ctit_reject_seconds),
            ctit_risk_seconds=env_float("ASCRIBE_FRAUD_CTIT_RISK_SECONDS", Rules.ctit_risk_seconds),
            ctit_long_seconds=env_float("ASCRIBE_FRAUD_CTIT_LONG_HOURS", Rules.ctit_long_seconds / 3600)
            * 3600,
            late_report_seconds=env_float("ASCRIBE_FRAUD_LATE_REPORT_HOURS", Rules.late_report_seconds / 3600)
            * 3600,
            code_max_distinct=env_int("ASCRIBE_FRAUD_CODE_MAX_DISTINCT", Rules.code_max_distinct, minimum=1),
        ).with_weights(weights)
        if rules.review_score > rules.reject_score:
            raise ConfigError("ASCRIBE_FRAUD_REVIEW_SCORE must not exceed ASCRIBE_FRAUD_REJECT_SCORE")
        lookback_days = env_int(
            "ASCRIBE_FRAUD_DEDUP_TTL_DAYS", StoreConfig.dedup_ttl_seconds // 86400, minimum=1
        )
        store = StoreConfig(
            prefix=env_str("ASCRIBE_FRAUD_KEY_PREFIX", StoreConfig.prefix),
            dedup_ttl_seconds=lookback_days * 86400,
            code_spread_ttl_seconds=env_int(
                "ASCRIBE_FRAUD_CODE_WINDOW_DAYS", StoreConfig.code_spread_ttl_seconds // 86400, minimum=1
            )
            * 86400,
            code_max_distinct=rules.code_max_distinct,
            spike_window_seconds=env_int(
                "ASCRIBE_FRAUD_SPIKE_WINDOW_SECONDS", StoreConfig.spike_window_seconds, minimum=1
            ),
            spike_baseline_seconds=env_int(
                "ASCRIBE_FRAUD_SPIKE_BASELINE_HOURS", StoreConfig.spike_baseline_seconds // 3600, minimum=1
            )
            * 3600,
            spike_min_volume=env_int(
                "ASCRIBE_FRAUD_SPIKE_MIN_VOLUME", StoreConfig.spike_min_volume, minimum=1
            ),
            spike_factor=env_float("ASCRIBE_FRAUD_SPIKE_FACTOR", StoreConfig.spike_factor, minimum=1.0),
            burst_window_seconds=env_int(
                "ASCRIBE_FRAUD_BURST_WINDOW_SECONDS", StoreConfig.burst_window_seconds, minimum=1
            ),
            burst_min_volume=env_int(
                "ASCRIBE_FRAUD_BURST_MIN_VOLUME", StoreConfig.burst_min_volume, minimum=1
            ),
            burst_factor=env_float("ASCRIBE_FRAUD_BURST_FACTOR", StoreConfig.burst_factor, minimum=1.0),
            surge_min_volume=env_int(
                "ASCRIBE_FRAUD_SURGE_MIN_VOLUME", StoreConfig.surge_min_volume, minimum=1
            ),
            surge_factor=env_float("ASCRIBE_FRAUD_SURGE_FACTOR", StoreConfig.surge_factor, minimum=1.0),
            alerts_maxlen=env_int("ASCRIBE_FRAUD_ALERTS_MAXLEN", StoreConfig.alerts_maxlen, minimum=100),
            key_buckets=env_int("ASCRIBE_FRAUD_KEY_BUCKETS", StoreConfig.key_buckets, minimum=1),
            addresses_per_hour=env_int(
                "ASCRIBE_FRAUD_ADDRESSES_PER_HOUR", StoreConfig.addresses_per_hour, minimum=1
            ),
            visitors_per_day=env_int("ASCRIBE_FRAUD_VISITORS_PER_DAY", StoreConfig.visitors_per_day, minimum=1),
            guess_threshold=env_int("ASCRIBE_FRAUD_GUESS_THRESHOLD", StoreConfig.guess_threshold, minimum=1),
            guess_window_seconds=env_int(
                "ASCRIBE_FRAUD_GUESS_WINDOW_SECONDS", StoreConfig.guess_window_seconds, minimum=1
            ),
        )
        transport = Transport.from_env(serves=True)
        allowed_clients = frozenset(
            name.strip() for name in env_str("ASCRIBE_FRAUD_ALLOWED_CLIENTS", "").split(",") if name.strip()
        )
        if allowed_clients and not transport.tls.client_auth:
            raise ConfigError("ASCRIBE_FRAUD_ALLOWED_CLIENTS needs ASCRIBE_TLS_CLIENT_AUTH=1 (client certificates)")
        if store.spike_baseline_seconds <= store.spike_window_seconds:
            raise ConfigError("ASCRIBE_FRAUD_SPIKE_BASELINE_HOURS must be longer than the spike window")
        return cls(
            redis_url=redis_url_from_env(),
            addr=addr,
            metrics_host=metrics_host,
            metrics_port=env_int("ASCRIBE_FRAUD_METRICS_PORT", cls.metrics_port),
            internal_token=internal_token,
            **ipintel_from_env(),
            redis_timeout_ms=env_int("ASCRIBE_FRAUD_REDIS_TIMEOUT_MS", cls.redis_timeout_ms, minimum=1),
            redis_max_connections=env_int(
                "ASCRIBE_FRAUD_REDIS_MAX_CONNECTIONS", cls.redis_max_connections, minimum=1
            ),
            redis_cluster=env_bool("ASCRIBE_FRAUD_REDIS_CLUSTER", cls.redis_cluster),
            watch_block_ms=env_int("ASCRIBE_FRAUD_WATCH_BLOCK_MS", cls.watch_block_ms, minimum=10),
            check_linger_ms=env_int("ASCRIBE_FRAUD_CHECK_LINGER_MS", cls.check_linger_ms, minimum=0),
            max_batch=env_int("ASCRIBE_FRAUD_MAX_BATCH", cls.max_batch, minimum=1),
            max_future_seconds=env_int("ASCRIBE_FRAUD_MAX_FUTURE_SECONDS", cls.max_future_seconds),
            rules=rules,
            store=store,
            transport=transport,
            health_addr=health_addr_from_env("ASCRIBE_FRAUD_HEALTH_ADDR"),
            allowed_clients=allowed_clients,
        )
