"""Settings of the HTTP gateway, from the environment (fails fast, never logs secrets)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from services.common.channels import Transport
from services.common.env import (
    ConfigError,
    env_bool,
    env_int,
    env_optional,
    env_str,
    is_loopback_host,
    require_token_off_loopback,
    split_host_port,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED_PROXIES = "127.0.0.1/32,::1/128"


def parse_networks(raw: str, name: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of IPs or CIDRs; ``none`` trusts nobody."""
    networks: list[IPNetwork] = []
    if raw.strip().lower() == "none":
        return ()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not an IP address or CIDR") from None
    return tuple(networks)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # /metrics has its own listener, never the tracking port: a network policy
    # can then keep it from the public (ASCRIBE_GATEWAY_METRICS_PORT; 0: off).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9103
    attribution_addr: str = "127.0.0.1:50051"
    fraud_addr: str = "127.0.0.1:50052"
    internal_token: str | None = field(default=None, repr=False)
    trusted_proxies: tuple[IPNetwork, ...] = parse_networks(DEFAULT_TRUSTED_PROXIES, "ASCRIBE_TRUSTED_PROXIES")
    debug_headers: bool = False
    # Per attribution call; a click batch waits on the database commit and the fraud check.
    deadline_ms: int = 2000
    # Readiness probes must answer quickly even when a backend hangs.
    health_deadline_ms: int = 500
    access_log: bool = False
    click_max_batch: int = 256
    # A click batch starts no sooner than this after the previous one (0: as
    # soon as none is in flight). See MicroBatcher's min_interval.
    click_linger_ms: int = 12
    batch_conversions: bool = True
    conversion_max_batch: int = 128
    # Click batches in flight at once (the linger keeps them few and full).
    click_max_in_flight: int = 1
    # Click batches travel as messages on one RecordClickStream instead of one
    # RecordClickBatch call each (see services/common/batch_stream.py).
    click_stream: bool = True
    # A second conversion batch goes while one is in flight only once this
    # many postbacks wait: overlapping two batches hides each one's database
    # and fraud round trips, and the minimum keeps batches large enough that
    # per-call costs do not eat the gain (measured in the bench notes).
    conversion_max_in_flight: int = 2
    conversion_busy_min_batch: int = 24
    shutdown_grace_seconds: float = 4.0
    # A POST body that has not arrived whole by then is answered 408 and its
    # connection closed (a body that never comes held one for minutes).
    body_timeout_ms: int = 10_000
    # Admission control (gateway/admission.py). A click or postback that
    # cannot start within the budget is answered 503 with Retry-After at once.
    queue_budget_ms: int = 250
    # Past this many open connections a new one is answered 503 and closed.
    # Each admitted connection is a client the event loop serves in turn, so
    # this bounds the loop's lag (and the RSS): with wrk at 4,000 connections
    # a cap of 1,024 kept clicks at the peak rate, where 4,096 let the loop
    # fall so far behind that most clicks were shed (bench/overload.py).
    max_connections: int = 1024
    # A request head (request line and headers) must arrive whole within this.
    header_timeout_ms: int = 5_000
    # An idle keep-alive connection is closed after this (it holds a slot of max_connections).
    # Short: a visitor's browser keeps a connection it will not use again.
    idle_timeout_ms: int = 15_000
    # The kernel caps it at net.core.somaxconn (4096 on this machine): asking
    # for more lets an operator who raises the sysctl get it without a setting.
    # wrk's burst of 10,000 connects overflowed a 4,096 queue (34,550 listen
    # drops in one run, retried SYNs that wrk counts as timeouts).
    listen_backlog: int = 16384
    # Keepalive and TLS of its channels to attribution and fraud.
    transport: Transport = field(default_factory=Transport)

    @property
    def deadline_seconds(self) -> float:
        return self.deadline_ms / 1000

    @property
    def health_deadline_seconds(self) -> float:
        return self.health_deadline_ms / 1000

    @classmethod
    def from_env(cls) -> Settings:
        host = env_str("ASCRIBE_GATEWAY_HOST", cls.host)
        attribution_addr = env_str("ASCRIBE_ATTRIBUTION_ADDR", cls.attribution_addr)
        attribution_host, _ = split_host_port(attribution_addr, "ASCRIBE_ATTRIBUTION_ADDR")
        fraud_addr = env_str("ASCRIBE_FRAUD_ADDR", cls.fraud_addr)
        split_host_port(fraud_addr, "ASCRIBE_FRAUD_ADDR")
        internal_token = env_optional("ASCRIBE_INTERNAL_TOKEN")
        metrics_host = env_str("ASCRIBE_GATEWAY_METRICS_HOST", host)
        require_token_off_loopback(
            internal_token,
            "ASCRIBE_INTERNAL_TOKEN",
            {"ASCRIBE_GATEWAY_HOST": host, "ASCRIBE_GATEWAY_METRICS_HOST": metrics_host},
        )
        if not internal_token and not is_loopback_host(attribution_host):
            # An attribution service off loopback refuses recording RPCs without the
            # token; better to say so at start-up than to answer 401 to every postback.
            raise ConfigError(
                "ASCRIBE_INTERNAL_TOKEN is unset but ASCRIBE_ATTRIBUTION_ADDR is not on loopback"
            )
        port = env_int("ASCRIBE_GATEWAY_PORT", cls.port)
        if port > 65535:
            raise ConfigError(f"ASCRIBE_GATEWAY_PORT must be a TCP port, got {port}")
        metrics_port = env_int("ASCRIBE_GATEWAY_METRICS_PORT", cls.metrics_port)
        if metrics_port > 65535:
            raise ConfigError(f"ASCRIBE_GATEWAY_METRICS_PORT must be a TCP port (0: off), got {metrics_port}")
        if metrics_port and metrics_port == port and metrics_host == host:
            raise ConfigError("ASCRIBE_GATEWAY_METRICS_PORT must differ from ASCRIBE_GATEWAY_PORT")
        return cls(
            host=host,
            port=port,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            attribution_addr=attribution_addr,
            fraud_addr=fraud_addr,
            internal_token=internal_token,
            trusted_proxies=parse_networks(
                env_str("ASCRIBE_TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES), "ASCRIBE_TRUSTED_PROXIES"
            ),
            debug_headers=env_bool("ASCRIBE_DEBUG_HEADERS", cls.debug_headers),
            deadline_ms=env_int("ASCRIBE_GATEWAY_DEADLINE_MS", cls.deadline_ms, minimum=1),
            health_deadline_ms=env_int(
                "ASCRIBE_GATEWAY_HEALTH_DEADLINE_MS", cls.health_deadline_ms, minimum=1
            ),
            access_log=env_bool("ASCRIBE_GATEWAY_ACCESS_LOG", cls.access_log),
            body_timeout_ms=env_int("ASCRIBE_GATEWAY_BODY_TIMEOUT_MS", cls.body_timeout_ms, minimum=1),
            click_max_batch=env_int("ASCRIBE_GATEWAY_CLICK_MAX_BATCH", cls.click_max_batch, minimum=1),
            click_linger_ms=env_int("ASCRIBE_GATEWAY_CLICK_LINGER_MS", cls.click_linger_ms, minimum=0),
            batch_conversions=env_bool("ASCRIBE_GATEWAY_BATCH_CONVERSIONS", cls.batch_conversions),
            conversion_max_batch=env_int(
                "ASCRIBE_GATEWAY_CONVERSION_MAX_BATCH", cls.conversion_max_batch, minimum=1
            ),
            click_stream=env_bool("ASCRIBE_GATEWAY_CLICK_STREAM", cls.click_stream),
            click_max_in_flight=env_int(
                "ASCRIBE_GATEWAY_CLICK_MAX_IN_FLIGHT", cls.click_max_in_flight, minimum=1
            ),
            conversion_max_in_flight=env_int(
                "ASCRIBE_GATEWAY_CONVERSION_MAX_IN_FLIGHT", cls.conversion_max_in_flight, minimum=1
            ),
            conversion_busy_min_batch=env_int(
                "ASCRIBE_GATEWAY_CONVERSION_BUSY_MIN_BATCH", cls.conversion_busy_min_batch, minimum=1
            ),
            queue_budget_ms=env_int("ASCRIBE_GATEWAY_QUEUE_BUDGET_MS", cls.queue_budget_ms, minimum=1),
            max_connections=env_int("ASCRIBE_GATEWAY_MAX_CONNECTIONS", cls.max_connections, minimum=1),
            header_timeout_ms=env_int("ASCRIBE_GATEWAY_HEADER_TIMEOUT_MS", cls.header_timeout_ms, minimum=1),
            idle_timeout_ms=env_int("ASCRIBE_GATEWAY_IDLE_TIMEOUT_MS", cls.idle_timeout_ms, minimum=1),
            listen_backlog=env_int("ASCRIBE_GATEWAY_LISTEN_BACKLOG", cls.listen_backlog, minimum=1),
            transport=Transport.from_env(serves=False),
        )
