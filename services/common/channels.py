"""How our gRPC processes talk to each other: keepalive, TLS, and the one channel factory.

Every channel between our services is made by ``open_channel`` and every
server by ``services.common.grpc_server.start_server`` with
``server_options``, both from one ``Transport`` read from the environment, so
the two ends of every hop (gateway -> attribution, gateway -> fraud,
attribution -> fraud) agree on the ping policy and on TLS.

Keepalive: a client pings a connection that has carried no data for
``keepalive_ms``. gRPC servers by default accept a ping without data only
every 5 minutes and send GOAWAY ``too_many_pings`` after two strikes, which
dropped the gateway's connection about 2.5 minutes after start. Our servers
accept pings down to ``min_ping_interval_ms`` (never above the clients'
interval: ``Keepalive.from_env`` refuses that), with or without calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.env import ConfigError, env_int
from services.common.grpc_client_metrics import client_interceptors
from services.common.tls import TlsSettings
from services.common.tls_channel import ReloadingChannel

# Requests and answers carry batches of up to thousands of clicks.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# gRPC's own default, stated: a client pinging faster than the server allows
# is dropped at the third ping too soon, so a broken client cannot flood a server.
MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class Keepalive:
    """Ping intervals; both ends read the same settings, so they always agree."""

    # A client pings a connection idle this long (ASCRIBE_GRPC_KEEPALIVE_MS),
    keepalive_ms: int = 30_000
    # and closes it when the answer takes longer (ASCRIBE_GRPC_KEEPALIVE_TIMEOUT_MS).
    keepalive_timeout_ms: int = 10_000
    # A server accepts pings without data this often (ASCRIBE_GRPC_MIN_PING_INTERVAL_MS);
    # below the clients' interval, so timer jitter never makes a ping "too soon".
    min_ping_interval_ms: int = 15_000

    @classmethod
    def from_env(cls) -> Keepalive:
        keepalive = cls(
            # gRPC sends keepalive pings at most once a second whatever is asked.
            keepalive_ms=env_int("ASCRIBE_GRPC_KEEPALIVE_MS", cls.keepalive_ms, minimum=1000),
            keepalive_timeout_ms=env_int(
                "ASCRIBE_GRPC_KEEPALIVE_TIMEOUT_MS", cls.keepalive_timeout_ms, minimum=1
            ),
            min_ping_interval_ms=env_int(
                "ASCRIBE_GRPC_MIN_PING_INTERVAL_MS", cls.min_ping_interval_ms, minimum=1
            ),
        )
        if keepalive.min_ping_interval_ms > keepalive.keepalive_ms:
            raise ConfigError(
                "ASCRIBE_GRPC_MIN_PING_INTERVAL_MS must not exceed ASCRIBE_GRPC_KEEPALIVE_MS: "
                "servers would drop our own clients' connections (GOAWAY too_many_pings)"
            )
        return keepalive


@dataclass(frozen=True)
class Transport:
    """What every channel and server of a process is built with."""

    keepalive: Keepalive = field(default_factory=Keepalive)
    tls: TlsSettings = field(default_factory=TlsSettings)

    @classmethod
    def from_env(cls, *, serves: bool) -> Transport:
        """``serves``: the process runs a gRPC server (it then needs a certificate under TLS)."""
        return cls(keepalive=Keepalive.from_env(), tls=TlsSettings.from_env(serves=serves))


def server_options(keepalive: Keepalive) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its string has
        # no "recv", and gRPC ignores an argument it does not know, silently.
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        # Our clients ping idle channels too (a readiness probe's channel, a
        # channel between bursts); without this a ping with no call open counts
        # as a strike whatever its interval.
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(keepalive: Keepalive) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC otherwise sends two pings without data and then one a minute:
        # a dead peer behind a long-lived idle stream (the click streams,
        # WatchAlerts) would go unnoticed for that long.
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect soon after a service comes back, rather than failing for
        # up to two minutes of gRPC's default backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def open_channel(addr: str, transport: Transport) -> grpc.aio.Channel:
    """The channel to one of our services at ``addr``, with TLS when it is configured.

    Under TLS it follows the certificate files (services.common.tls_channel):
    a rotated CA or client certificate is used without a restart. Every call
    is counted in the grpc_client_* metrics (services.common.grpc_client_metrics).
    """
    options = channel_options(transport.keepalive)
    if not transport.tls.enabled:
        return grpc.aio.insecure_channel(addr, options=options, interceptors=client_interceptors())
    if transport.tls.server_name:
        options.append(("grpc.ssl_target_name_override", transport.tls.server_name))

    def secure(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(addr, credentials, options=options, interceptors=client_interceptors())

    return ReloadingChannel(transport.tls, secure)
