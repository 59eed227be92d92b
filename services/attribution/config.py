"""Settings of the attribution service, from the environment (fails fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.attribution.webhooks import rules
from services.attribution.webhooks.settings import WebhookConfig
from services.common.channels import Transport
from services.common.env import (
    ConfigError,
    env_bool,
    env_int,
    env_optional,
    env_str,
    health_addr_from_env,
    require_token_off_loopback,
    split_host_port,
)


def database_url_from_env() -> str:
    url = env_optional("ASCRIBE_DATABASE_URL")
    if not url:
        raise ConfigError(
            "ASCRIBE_DATABASE_URL is unset (make run starts an embedded PostgreSQL and sets it)"
        )
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str
    addr: str = "127.0.0.1:50051"
    fraud_addr: str = "127.0.0.1:50052"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    admin_token: str | None = None
    internal_token: str | None = None
    fraud_deadline_ms: int = 50
    db_pool_min: int = 4
    db_pool_max: int = 20
    db_statement_timeout_ms: int = 5000
    background_jobs: bool = True
    auto_hold_leaked_codes: bool = True
    # Click fraud checks travel as messages on one CheckClickStream instead of
    # one CheckClickBatch call each (see services/common/batch_stream.py).
    fraud_click_stream: bool = True
    # How long a replica may act on a catalog record (a status, a rule)
    # changed by a person elsewhere. No use is taken on a cached counter (the
    # redemption's UPDATE reads the row); click tracking reads the cached
    # remaining uses (catalog/cache.py).
    catalog_cache_ms: int = 1000
    approval_interval_ms: int = 5000
    rescore_interval_ms: int = 10000
    # How often the report rollups' deltas are folded (reports read the
    # deltas too, so this bounds the table's growth, not freshness).
    report_compact_interval_ms: int = 30000
    # The most conversions a second the re-scoring job checks while it drains
    # a backlog: above the 2,000/s, below what would crowd out live
    # clicks and postbacks on a small machine.
    rescore_per_second: int = 2500
    # A MaxMind or DB-IP .mmdb for visitors' countries; None: the iptocc wheel's data.
    geoip_db: Path | None = None
    # Keepalive and TLS of its server and of its channel to fraud.
    transport: Transport = field(default_factory=Transport)
    # A plaintext port answering only grpc.health.v1.Health (probes, under TLS).
    health_addr: str | None = None
    # Webhooks (issue #18): see services/attribution/webhooks/delivery.py.
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)

    def __repr__(self) -> str:  # secrets never reach the logs
        return (
            f"Settings(addr={self.addr!r}, fraud_addr={self.fraud_addr!r}, metrics_port={self.metrics_port})"
        )

    @classmethod
    def from_env(cls) -> Settings:
        addr = env_str("ASCRIBE_ATTRIBUTION_ADDR", cls.addr)
        host, _ = split_host_port(addr, "ASCRIBE_ATTRIBUTION_ADDR")
        metrics_host = env_str("ASCRIBE_ATTRIBUTION_METRICS_HOST", host or cls.metrics_host)
        admin_token = env_optional("ASCRIBE_ADMIN_TOKEN")
        internal_token = env_optional("ASCRIBE_INTERNAL_TOKEN")
        binds = {"ASCRIBE_ATTRIBUTION_ADDR": host, "ASCRIBE_ATTRIBUTION_METRICS_HOST": metrics_host}
        require_token_off_loopback(admin_token, "ASCRIBE_ADMIN_TOKEN", binds)
        require_token_off_loopback(internal_token, "ASCRIBE_INTERNAL_TOKEN", binds)
        return cls(
            database_url=database_url_from_env(),
            addr=addr,
            fraud_addr=env_str("ASCRIBE_FRAUD_ADDR", cls.fraud_addr),
            metrics_host=metrics_host,
            metrics_port=env_int("ASCRIBE_ATTRIBUTION_METRICS_PORT", cls.metrics_port),
            admin_token=admin_token,
            internal_token=internal_token,
            fraud_deadline_ms=env_int("ASCRIBE_FRAUD_DEADLINE_MS", cls.fraud_deadline_ms, minimum=1),
            db_pool_min=env_int("ASCRIBE_DB_POOL_MIN", cls.db_pool_min, minimum=1),
            db_pool_max=env_int("ASCRIBE_DB_POOL_MAX", cls.db_pool_max, minimum=1),
            db_statement_timeout_ms=env_int(
                "ASCRIBE_DB_STATEMENT_TIMEOUT_MS", cls.db_statement_timeout_ms, minimum=1
            ),
            background_jobs=env_bool("ASCRIBE_BACKGROUND_JOBS", cls.background_jobs),
            fraud_click_stream=env_bool("ASCRIBE_FRAUD_CLICK_STREAM", cls.fraud_click_stream),
            auto_hold_leaked_codes=env_bool("ASCRIBE_AUTO_HOLD_LEAKED_CODES", cls.auto_hold_leaked_codes),
            catalog_cache_ms=env_int("ASCRIBE_CATALOG_CACHE_MS", cls.catalog_cache_ms),
            approval_interval_ms=env_int(
                "ASCRIBE_APPROVAL_INTERVAL_MS", cls.approval_interval_ms, minimum=10
            ),
            rescore_interval_ms=env_int("ASCRIBE_RESCORE_INTERVAL_MS", cls.rescore_interval_ms, minimum=10),
            rescore_per_second=env_int("ASCRIBE_RESCORE_PER_SECOND", cls.rescore_per_second, minimum=1),
            report_compact_interval_ms=env_int(
                "ASCRIBE_REPORT_COMPACT_INTERVAL_MS", cls.report_compact_interval_ms, minimum=100
            ),
            geoip_db=_geoip_db(),
            transport=Transport.from_env(serves=True),
            health_addr=health_addr_from_env("ASCRIBE_ATTRIBUTION_HEALTH_ADDR"),
            webhooks=_webhook_config(),
        )


def _webhook_config() -> WebhookConfig:
    raw_schedule = env_optional("ASCRIBE_WEBHOOK_RETRY_SCHEDULE")
    schedule = rules.DEFAULT_SCHEDULE_SECONDS
    if raw_schedule is not None:
        try:
            schedule = rules.parse_schedule(raw_schedule)
        except ValueError as error:
            raise ConfigError(f"ASCRIBE_WEBHOOK_RETRY_SCHEDULE: {error}, got {raw_schedule!r}") from None
    return WebhookConfig(
        allow_private_networks=env_bool("ASCRIBE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", False),
        schedule=schedule,
        poll_seconds=env_int("ASCRIBE_WEBHOOK_POLL_MS", round(WebhookConfig.poll_seconds * 1000), minimum=10) / 1000,
        concurrency=env_int("ASCRIBE_WEBHOOK_CONCURRENCY", WebhookConfig.concurrency, minimum=1),
        per_destination=env_int("ASCRIBE_WEBHOOK_PER_DESTINATION", WebhookConfig.per_destination, minimum=1),
    )


def _geoip_db() -> Path | None:
    """ASCRIBE_GEOIP_DB, which must name a readable .mmdb file when set."""
    raw = env_optional("ASCRIBE_GEOIP_DB")
    if raw is None:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"ASCRIBE_GEOIP_DB must name a .mmdb file, got {raw!r} (no such file)")
    return path
