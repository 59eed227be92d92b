"""The delivery worker: outbox -> deliveries -> HTTP, at least once, on any number of replicas.

Each replica runs one ``WebhookWorker`` (started by server.py). A step fans
the outbox out to deliveries (rows taken with ``FOR UPDATE SKIP LOCKED`` and
deleted in the transaction that writes their deliveries, so each event fans
out once), then leases due deliveries (``SKIP LOCKED`` again; the lease is
what lets another replica retry after a crash) and sends them concurrently.
The outbox is polled every ``poll_seconds`` (1 s by default, well inside the
5 s the contract allows for a first attempt) rather than NOTIFYed: NOTIFY
takes a global lock at every commit, a cost the recording paths would pay.

Never a weapon: the URL's name is resolved by an injectable resolver, every
address is checked (``rules.forbidden_reason``) and the connection goes to
those checked addresses only (``_PinnedResolver``), keeping the Host header
and TLS SNI of the name; no redirects, no proxies from the environment, 5 s
for the whole attempt, at most 64 KB of the answer read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import grpc
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

from services.attribution import metrics
from services.attribution.common.database import DATABASE_UNAVAILABLE
from services.attribution.lifecycle import store as lifecycle_store
from services.attribution.lifecycle.changes import first_alert_cursor
from services.attribution.webhooks import rules, store
from services.attribution.webhooks.settings import WebhookConfig
from services.common.grpc_server import bearer_metadata
from services.common.tasks import raise_if_cancelling
from services.common.timestamps import utcnow

logger = logging.getLogger(__name__)

USER_AGENT = "ascribe-webhooks/1"
# How long a replica owns a delivery it is sending: past it (a crash),
# another replica sends it again. Above the 5 s an attempt may take.
LEASE = timedelta(seconds=15)


class Refused(Exception):
    """The destination is not allowed (SSRF rules) or cannot be resolved; never retried blindly."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _resolve(host: str, port: int, config: WebhookConfig) -> list[str]:
    try:
        async with asyncio.timeout(rules.REQUEST_TIMEOUT_SECONDS):
            addresses = await config.resolve(host, port)
    except (OSError, TimeoutError, UnicodeError) as error:
        raise Refused(f"{host} does not resolve ({type(error).__name__})") from None
    if not addresses:
        raise Refused(f"{host} does not resolve")
    return addresses


async def check_destination(url: str, config: WebhookConfig) -> tuple[str, list[str]]:
    """The URL's host and the addresses it may be reached at (Refused otherwise)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme not in ("http", "https") or not host:
        raise Refused("only http and https URLs with a host")
    addresses = [host] if _is_ip(host) else await _resolve(host, port, config)
    if not config.allow_private_networks:
        reason = rules.refused_addresses(addresses)
        if reason:
            raise Refused(f"{host}: {reason}")
    return host, addresses


class _PinnedResolver(AbstractResolver):
    """Answers the addresses already checked: a second lookup could answer another (DNS rebinding)."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"unexpected host {host!r}")
        return [
            ResolveResult(hostname=host, host=a, port=port,
                          family=socket.AF_INET6 if ":" in a else socket.AF_INET, proto=0,
                          flags=socket.AI_NUMERICHOST)
            for a in self._addresses
        ]

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Outgoing:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


def build_request(claimed: store.Claimed, now: datetime) -> Outgoing:
    """The HTTP request of one attempt, from the delivery's fixed payload and the webhook's current settings."""
    d, w = claimed.delivery, claimed.webhook
    obj: Mapping[str, Any] = d.payload.get("object", {})
    headers = {rules.DELIVERY_HEADER: d.id, "User-Agent": USER_AGENT, "X-Ascribe-Event": d.event}
    if w.kind == "partner_postback":
        values = rules.macro_values(d.event, obj)
        url = rules.render_url(w.url, values)
        if w.http_method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return Outgoing("POST", url, headers, rules.postback_form(values))
        return Outgoing("GET", url, headers, None)
    created = datetime.fromisoformat(str(d.payload["at"]))
    body = rules.event_body(d.event_id, d.event, created, obj)
    headers["Content-Type"] = "application/json"
    headers[rules.SIGNATURE_HEADER] = rules.sign(w.live_secrets(now), int(now.timestamp()), body)
    return Outgoing(w.http_method, w.url, headers, body)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None


async def send(request: Outgoing, config: WebhookConfig) -> Answer:
    """One attempt: Refused, an aiohttp/OS/timeout error, or the receiver's answer."""
    host, addresses = await check_destination(request.url, config)
    connector = aiohttp.TCPConnector(
        resolver=_PinnedResolver(host, addresses), use_dns_cache=False, force_close=True
    )
    timeout = aiohttp.ClientTimeout(total=rules.REQUEST_TIMEOUT_SECONDS)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session,
        session.request(
            # encoded=True: sent byte for byte as rendered (yarl would decode %2F).
            request.method, yarl.URL(request.url, encoded=True), headers=request.headers, data=request.body,
            allow_redirects=False, compress=None, chunked=None,
            # Certificates are always verified, against the URL's name (the
            # connection goes to the pinned address, SNI and checks use the name).
            ssl=config.ssl_context or True,
        ) as response,
    ):
        await response.content.read(rules.RESPONSE_CAP_BYTES)
        return Answer(response.status, response.headers.get("Retry-After"))


def conversion_object(row: Mapping[str, Any]) -> dict[str, Any]:
    """A conversion event's object: the gateway's postback JSON names, money as decimal strings."""
    obj: dict[str, Any] = {
        "id": row["conversion_id"], "campaign_id": row["campaign_id"], "order_id": row["order_id"] or "",
        "status": row["status"], "affiliate_id": row["affiliate_id"] or "",
        "amount": rules.money(row["amount_micros"] or 0), "refunded": rules.money(row["refunded_micros"] or 0),
        "payout": rules.money(row["payout_micros"] or 0), "currency": row["currency"] or "",
        "coupon_code": row["coupon_code"] or "", "click_id": row["click_id"] or "",
        "aff_click_id": row["external_click_id"] or "",
    }
    for n in range(1, 6):
        obj[f"sub{n}"] = row[f"sub{n}"] or ""
    return obj


def event_object(row: Mapping[str, Any]) -> dict[str, Any]:
    if row["conversion_id"]:
        return conversion_object(row)
    data = row["data"]
    extra: dict[str, Any] = json.loads(data) if isinstance(data, str) else dict(data or {})
    base = {"campaign_id": row["campaign_id"] or "", "coupon_code": row["coupon_code"] or ""}
    if row["status"]:
        base["status"] = row["status"]
    return {**base, **extra}


def matches(webhook: store.WebhookRow, row: Mapping[str, Any]) -> bool:
    if row["event"] not in webhook.events:
        return False
    if webhook.campaign_id and webhook.campaign_id != row["campaign_id"]:
        return False
    if webhook.affiliate_id and webhook.affiliate_id != row["affiliate_id"]:
        return False
    # A sale credited to nobody is no partner's to hear about.
    return not (webhook.kind == "partner_postback" and not row["affiliate_id"])


def destination_of(url: str) -> str:
    """A receiver, for the concurrency limit: host and port (the default port spelled out)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


@dataclass
class WebhookWorker:
    pool: asyncpg.Pool
    config: WebhookConfig
    clock: Callable[[], datetime] = utcnow
    rnd: random.Random = field(default_factory=random.Random)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    _per_destination: dict[str, int] = field(default_factory=dict)
    # webhook id -> its receiver (host:port), learned from its attempts.
    _destinations: dict[str, str] = field(default_factory=dict)
    _last_cleanup: float = 0.0
    _last_lag: float = 0.0

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except DATABASE_UNAVAILABLE as error:
                    # Readiness reports the outage; a traceback a second would only bury it.
                    logger.info("webhook step waits for PostgreSQL (%s)", type(error).__name__)
                except Exception:
                    logger.exception("webhook step failed; retrying in %.1fs", self.config.poll_seconds)
                raise_if_cancelling()
                try:
                    async with asyncio.timeout(self.config.poll_seconds):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                self.wake.clear()
        finally:
            for task in self._inflight:
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def step(self) -> None:
        await self.fan_out()
        free = self.config.concurrency - len(self._inflight)
        if free > 0:
            full = {dest for dest, n in self._per_destination.items() if n >= self.config.per_destination}
            skip = [webhook_id for webhook_id, dest in self._destinations.items() if dest in full]
            for claimed in await store.claim_due(
                self.pool, self.clock(), free, LEASE, per_webhook=self.config.per_destination, skip_webhooks=skip
            ):
                task = asyncio.create_task(self._attempt(claimed))
                self._inflight.add(task)
                task.add_done_callback(self._finished)
        if time.monotonic() - self._last_lag > 10:
            self._last_lag = time.monotonic()
            metrics.WEBHOOK_DELIVERY_LAG_SECONDS.set(await store.delivery_lag_seconds(self.pool, self.clock()))
        if time.monotonic() - self._last_cleanup > 3600:
            self._last_cleanup = time.monotonic()
            # Chunks, so no statement holds many rows' locks; a day's worth at most per hour.
            for _ in range(200):
                if await store.delete_old_deliveries(self.pool, self.clock()) < store.CLEANUP_CHUNK:
                    break

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.wake.set()  # a free slot: claim the next due delivery now, not at the next poll

    async def fan_out(self, batch: int = 500) -> int:
        """Outbox events -> one delivery per matching webhook, in one transaction per batch."""
        total = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await store.take_outbox(conn, batch)
                if not rows:
                    return total
                webhooks = await store.enabled_webhooks(conn)
                now = self.clock()
                deliveries = []
                for row in rows:
                    targets = [w for w in webhooks if matches(w, row)]
                    if not targets:
                        continue
                    event_id = (f"{store.EVENT_ID_PREFIX}alert_{row['alert_id']}" if row["alert_id"]
                                else f"{store.EVENT_ID_PREFIX}{row['id']}")
                    payload = json.dumps({"at": row["at"].isoformat(), "object": event_object(row)})
                    deliveries += [
                        (store.new_id(store.DELIVERY_ID_PREFIX), w.id, event_id, row["event"], payload, now)
                        for w in targets
                    ]
                await store.insert_deliveries(conn, deliveries)
            metrics.WEBHOOK_EVENTS_TOTAL.inc(len(rows))
            total += len(rows)
            if len(rows) < batch:
                return total

    async def _attempt(self, claimed: store.Claimed) -> None:
        try:
            await self._attempt_once(claimed)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Its lease runs out and a replica sends it again: at least once.
            logger.exception("webhook delivery %s: recording its attempt failed", claimed.delivery.id)

    async def _attempt_once(self, claimed: store.Claimed) -> None:
        d = claimed.delivery
        now = self.clock()
        try:
            request = build_request(claimed, now)
        except (KeyError, ValueError) as error:  # a template changed under a stored payload
            await self._dead(d, 0, f"cannot build the request: {error}")
            return
        destination = destination_of(request.url)
        self._destinations[d.webhook_id] = destination
        if self._per_destination.get(destination, 0) >= self.config.per_destination:
            # That receiver already has its share: back in the queue, so it
            # cannot hold the slots every other receiver needs.
            await store.release_claim(self.pool, d.id, d.attempts, now + timedelta(seconds=0.2))
            return
        self._per_destination[destination] = self._per_destination.get(destination, 0) + 1
        try:
            with metrics.WEBHOOK_ATTEMPT_SECONDS.time():
                answer = await send(request, self.config)
        except Refused as error:
            metrics.WEBHOOK_ATTEMPTS_TOTAL.labels("refused").inc()
            await self._dead(d, 0, f"refused: {error}")
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            await self._retry(d, 0, f"{type(error).__name__}: {error}"[:300], None)
            return
        finally:
            self._per_destination[destination] -= 1
            if not self._per_destination[destination]:
                del self._per_destination[destination]
        outcome = rules.outcome_of(answer.status, answer.retry_after, self.clock())
        if outcome.state == "delivered":
            metrics.WEBHOOK_ATTEMPTS_TOTAL.labels("delivered").inc()
            await store.record_delivered(self.pool, d.id, d.attempts, answer.status, self.clock())
        elif outcome.state == "retry":
            await self._retry(d, answer.status, outcome.error, outcome.retry_after)
        else:
            await self._dead(d, answer.status, outcome.error)

    async def _retry(self, d: store.DeliveryRow, status: int, error: str, retry_after: float | None) -> None:
        delay = rules.retry_delay(d.attempts, self.config.schedule, self.rnd)
        if delay is None:
            await self._dead(d, status, f"out of retries after {d.attempts} attempts; last: {error}")
            return
        if retry_after is not None:
            delay = min(retry_after, 86400.0)  # the receiver knows when it is back, within a day
        metrics.WEBHOOK_ATTEMPTS_TOTAL.labels("retry").inc()
        await store.record_retry(self.pool, d.id, d.attempts, status, error, self.clock() + timedelta(seconds=delay))

    async def _dead(self, d: store.DeliveryRow, status: int, error: str) -> None:
        metrics.WEBHOOK_ATTEMPTS_TOTAL.labels("dead").inc()
        if await store.record_dead(self.pool, d.id, d.attempts, status, error, self.clock()):
            metrics.WEBHOOK_DEAD_TOTAL.inc()
            logger.warning("webhook delivery %s of webhook %s is dead: %s", d.id, d.webhook_id, error)


# ------------------------------------------------------------ fraud alerts

ALERT_CURSOR = "webhooks"


def alert_event(kind: int) -> str | None:
    """The event word of an alert kind (None for a kind without one)."""
    try:
        name = fraud_pb2.AlertKind.Name(kind)  # type: ignore[arg-type]
    except ValueError:
        return None
    return rules.ALERT_EVENTS_BY_KIND_NAME.get(name)


async def follow_alerts(
    pool: asyncpg.Pool, channel: grpc.aio.Channel, internal_token: str | None, *, reconnect_seconds: float = 2.0
) -> None:
    """Turns the fraud service's alerts into outbox events, resuming after the cursor kept in PostgreSQL.

    The event and the cursor are written in one transaction, and the outbox
    and the deliveries are unique on the alert id, so every replica may follow
    the stream and each alert is still one event.
    """
    stub = fraud_pb2_grpc.FraudServiceStub(channel)
    while True:
        try:
            after_id = await lifecycle_store.get_alert_cursor(pool, ALERT_CURSOR) or first_alert_cursor()
            stream = stub.WatchAlerts(
                fraud_pb2.WatchAlertsRequest(after_id=after_id), metadata=bearer_metadata(internal_token)
            )
            async for alert in stream:
                event = alert_event(alert.kind)
                async with pool.acquire() as conn, conn.transaction():
                    if event is not None:
                        data = {
                            "id": alert.id, "kind": event.split(".", 1)[1], "campaign_id": alert.campaign_id,
                            "coupon_code": alert.coupon_code, "affiliate_id": alert.affiliate_id,
                            "ip": alert.ip, "detail": alert.detail,
                            "at": rules.rfc3339(alert.at.ToDatetime(tzinfo=UTC)) if alert.HasField("at") else "",
                        }
                        await store.insert_alert_event(conn, alert.id, event, alert.campaign_id, data)
                    await lifecycle_store.set_alert_cursor(conn, ALERT_CURSOR, alert.id)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.info("webhook alert stream interrupted (%s); reconnecting", type(error).__name__)
        raise_if_cancelling()
        await asyncio.sleep(reconnect_seconds)
