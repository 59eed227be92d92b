"""What the webhook worker and the creation checks are configured with (ASCRIBE_WEBHOOK_*)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.attribution.webhooks import rules

# host, port -> addresses. Injectable so tests need no public DNS.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class WebhookConfig:
    # Tests only: lets webhooks reach loopback, private and link-local addresses.
    allow_private_networks: bool = False
    # Seconds between tries (each ±20 %); after the last the delivery is dead.
    schedule: tuple[float, ...] = rules.DEFAULT_SCHEDULE_SECONDS
    # How often a replica looks at the outbox and for due retries.
    poll_seconds: float = 1.0
    # Attempts in flight per replica, and per receiver (host and port), so a
    # slow receiver holds at most its own share.
    concurrency: int = 64
    per_destination: int = 8
    resolve: Resolve = system_resolve
    # The CAs receivers' certificates are checked against; None: the system's.
    # Injectable so tests can run an https receiver with a CA of their own.
    ssl_context: ssl.SSLContext | None = None
