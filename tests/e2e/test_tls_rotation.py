"""Certificate rotation under mutual TLS across the three real processes, without a restart.

The gateway, the attribution service and the fraud service run as OS
processes (tools.stack) with mutual TLS on both hops (gateway -> attribution,
attribution -> fraud; the fraud service takes FraudService calls from the
attribution identity only), each with its own CA bundle, certificate and key
files, which the test replaces the way cert-manager or a secret mount does
(a new file renamed over the old one) while clicks and conversions keep
arriving through the gateway's HTTP port:

1. traffic flows, every verdict from the fraud service;
2. every service's pair is renewed (new serials, a shorter life): new
   handshakes get the new certificates, the expiry metrics follow, and no
   click or conversion fails or loses its fraud verdict: the contract's
   failure modes (503 for a backend that is down, ``fraud_unavailable`` for a
   missed fraud check) must not occur (the fraud deadline is 2 s here, so a
   slow handshake on a loaded machine cannot blur that);
3. the attribution service's pair is replaced by one from another CA (the
   bundles unchanged): its peers refuse it. The fraud service refuses its
   client certificate, so clicks and conversions are still answered and
   recorded, FLAGGED with ``fraud_unavailable`` (fail-open); once the
   gateway makes a new connection (its own pair renewed) it refuses
   attribution's server certificate and answers ``503 unavailable``, nothing
   else. Putting a good pair back heals both hops;

and the three pids never change.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from cryptography import x509

from tools.stack import HOST, Stack, free_port, grpc_serving

pytestmark = pytest.mark.slow

UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
# Every wait is bounded by this; the scenario (once the stack is up) by TEST_BUDGET_S.
STEP_DEADLINE_S = 20.0
# Four steps each wait for a client's file check (every 5 s) and healing for a
# reconnect backoff: about 22 s at worst before the traffic; 60 s leaves room
# on a loaded machine while STEP_DEADLINE_S still bounds any hang.
TEST_BUDGET_S = 60.0
GRPC_SERVICES = ("fraud", "attribution")


@dataclass(frozen=True)
class Leaf:
    chain: bytes
    key: bytes
    serial: int
    not_after: float


def issue(ca: trustme.CA, *identities: str, days: int) -> Leaf:
    leaf = ca.issue_cert(*identities, not_after=datetime.now(UTC) + timedelta(days=days))
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    certificate = x509.load_pem_x509_certificate(chain)
    return Leaf(chain, leaf.private_key_pem.bytes(), certificate.serial_number,
                certificate.not_valid_after_utc.timestamp())


class Files:
    """One service's CA bundle, certificate and key, at the paths its settings name."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        root.mkdir()
        self.ca, self.cert, self.key = root / "ca.pem", root / "tls.crt", root / "tls.key"
        self.ca.write_bytes(ca.cert_pem.bytes())

    def install(self, leaf: Leaf) -> None:
        """Key then certificate, each written aside and renamed over the old one (new inodes)."""
        for target, blob in ((self.key, leaf.key), (self.cert, leaf.chain)):
            staged = target.with_name(target.name + ".new")
            staged.write_bytes(blob)
            os.replace(staged, target)

    def env(self) -> dict[str, str]:
        return {
            "ASCRIBE_TLS_CA": str(self.ca), "ASCRIBE_TLS_CERT": str(self.cert), "ASCRIBE_TLS_KEY": str(self.key),
            "ASCRIBE_TLS_CLIENT_AUTH": "1",
        }


@dataclass
class TlsStack(Stack):
    """A Stack whose services each get their own settings (their TLS files), ready on plaintext health ports."""

    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def environment(self, name: str) -> dict[str, str]:
        return {**super().environment(name), **self.service_env.get(name, {})}

    def is_ready(self, name: str) -> bool:
        if name == "gateway":
            return super().is_ready(name)
        # Under TLS the service port refuses a plaintext probe: the health port answers it.
        return grpc_serving(self.service_env[name][f"ASCRIBE_{name.upper()}_HEALTH_ADDR"])


def presented(port: int, client: Files) -> tuple[int, bool]:
    """A fresh TLS handshake with the gRPC port: the serial it presents, and whether our CA verifies it."""
    serial = -1
    for verify in (False, True):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_alpn_protocols(["h2"])
        context.load_cert_chain(client.cert, client.key)
        if verify:
            context.load_verify_locations(client.ca)
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with (
                socket.create_connection((HOST, port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                serial = x509.load_der_x509_certificate(der).serial_number
        except ssl.SSLCertVerificationError:
            assert verify, "a handshake that verifies nothing failed verification"
            return serial, False
    return serial, True


EXPIRY = re.compile(
    r'^ascribe_tls_certificate_expiration_timestamp_seconds\{certificate="certificate"\} (\S+)$', re.M
)


async def expiry_metric(http: aiohttp.ClientSession, port: int) -> float | None:
    async with http.get(f"http://{HOST}:{port}/metrics") as response:
        match = EXPIRY.search(await response.text())
    return float(match.group(1)) if match else None


def reloads(stack: Stack, name: str) -> int:
    """How many times ``name``'s client channels were made again from changed files (its log says)."""
    try:
        # The success line only: "... changed but do not load" (a key replaced
        # before its certificate, seen half-way) is not a reload.
        return stack.log_path(name).read_text().count("client TLS files changed (")
    except FileNotFoundError:
        return 0


async def streams_started(http: aiohttp.ClientSession, port: int, method: str) -> float:
    """``grpc_client_started_total`` of a client stream method on a /metrics page."""
    async with http.get(f"http://{HOST}:{port}/metrics") as response:
        text = await response.text()
    return sum(
        float(match.group(1))
        for match in re.finditer(rf'^grpc_client_started_total\{{[^}}]*grpc_method="{method}"[^}}]*\}} (\S+)$', text, re.M)
    )


async def readyz(http: aiohttp.ClientSession, stack: Stack) -> tuple[int, str]:
    async with http.get(f"{stack.gateway_url}/readyz") as response:
        return response.status, (await response.json())["checks"]["attribution"]


@dataclass
class Answer:
    phase: str
    kind: str  # "click" or "conversion"
    status: int
    click_id: str = ""
    decision: str = ""
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Load:
    """Clicks through the gateway, every third one followed by its conversion, until stopped."""

    http: aiohttp.ClientSession
    url: str
    token: str
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.stop.set()  # a failed request ends the waits at once, and the test with it

    async def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            phase = self.phase
            async with self.http.get(
                f"{self.url}/click", params={"campaign_id": "cmp", "aff_id": "aff"}, allow_redirects=False,
                headers={"User-Agent": UA, "X-Forwarded-For": f"203.0.113.{n % 200 + 1}"},
            ) as response:
                body = await response.json() if response.status != 302 else {}
                click_id = response.headers.get("X-Ascribe-Click-Id", "")
                decision = response.headers.get("X-Ascribe-Decision", "")
                self.answers.append(Answer(phase, "click", response.status, click_id, decision, body))
            if response.status == 302 and n % 3 == 0:
                phase = self.phase
                async with self.http.post(f"{self.url}/postback", headers={"X-Ascribe-Token": self.token}, params={
                    "campaign_id": "cmp", "order_id": f"order-{n}", "amount": "20.00", "currency": "EUR",
                    "click_id": click_id,
                    "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
                }) as response:
                    self.answers.append(Answer(
                        phase, "conversion", response.status, click_id, body=await response.json()
                    ))
            await asyncio.sleep(0.05)

    def of(self, phase: str, kind: str | None = None) -> list[Answer]:
        return [a for a in self.answers if a.phase == phase and (kind is None or a.kind == kind)]


async def until(what: str, check: Callable[[], Awaitable[bool]], load: Load | None = None) -> None:
    deadline = time.monotonic() + STEP_DEADLINE_S
    while time.monotonic() < deadline:
        if load is not None and load.stop.is_set():
            break
        if await check():
            return
        await asyncio.sleep(0.1)
    tail = load.answers[-5:] if load is not None else []
    pytest.fail(f"not within {STEP_DEADLINE_S:.0f}s: {what}; the last answers: {tail}")


@dataclass
class World:
    stack: TlsStack
    files: dict[str, Files]
    ours: trustme.CA
    operator: Files
    http: aiohttp.ClientSession


@pytest.fixture
async def world(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
    redis_client: Any,  # its teardown deletes the prefix's keys
) -> AsyncIterator[World]:
    ours = trustme.CA()
    files = {name: Files(tmp_path / name, ours) for name in (*GRPC_SERVICES, "gateway", "operator")}
    for name in GRPC_SERVICES:
        files[name].install(issue(ours, name, HOST, days=30))
    files["gateway"].install(issue(ours, "gateway", days=30))
    files["operator"].install(issue(ours, "operator", days=30))
    service_env = {name: files[name].env() for name in (*GRPC_SERVICES, "gateway")}
    for name in GRPC_SERVICES:
        service_env[name][f"ASCRIBE_{name.upper()}_HEALTH_ADDR"] = f"{HOST}:{free_port()}"
    service_env["fraud"]["ASCRIBE_FRAUD_ALLOWED_CLIENTS"] = "attribution"
    stack = TlsStack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path / "logs",
        env={
            "ASCRIBE_IPINTEL_DIR": str(ipintel_dir),
            "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
            "ASCRIBE_DEBUG_HEADERS": "1",
            "ASCRIBE_CATALOG_CACHE_MS": "0",
            "ASCRIBE_FRAUD_DEADLINE_MS": "2000",
        },
        service_env=service_env,
    )
    await asyncio.to_thread(stack.start)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield World(stack, files, ours, files.pop("operator"), http)
    finally:
        await asyncio.to_thread(stack.stop)


def operator_channel(world: World) -> grpc.aio.Channel:
    """The test's own channel to attribution, with its own certificate of our CA (a fresh handshake)."""
    files = world.operator
    credentials = grpc.ssl_channel_credentials(
        files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    )
    return grpc.aio.secure_channel(world.stack.addr("attribution"), credentials)


async def clicks_of(world: World, answers: list[Answer]) -> list[pb.Click]:
    async with operator_channel(world) as channel:
        tracking = attribution_pb2_grpc.TrackingServiceStub(channel)
        return [
            await tracking.GetClick(pb.GetClickRequest(click_id=answer.click_id), timeout=10)
            for answer in answers
        ]


async def test_certificates_rotate_across_the_running_services(world: World) -> None:
    stack = world.stack
    pids = stack.pids()
    assert set(pids) == {"fraud", "attribution", "gateway"}
    async with operator_channel(world) as channel:
        catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
        campaign = await catalog.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(
            id="cmp", name="Summer", landing_url="https://shop.example/summer", currency="EUR",
            payout_micros=5_000_000,
        )), timeout=10)
        await catalog.CreateAffiliate(
            pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff", name="aff", channel="social")), timeout=10
        )
    load = Load(world.http, stack.gateway_url, campaign.postback_token)
    runner = asyncio.create_task(load.run())
    try:
        async with asyncio.timeout(TEST_BUDGET_S):
            await _scenario(world, load)
    finally:
        load.stop.set()
        await runner  # raises what the load met (a refused connection, a timeout, a non-JSON answer)
    assert stack.pids() == pids, "a process was restarted"

    # 1 and 2: every click and conversion answered and judged by the fraud service.
    for phase in ("before", "renewed"):
        answers = load.of(phase)
        assert len(load.of(phase, "conversion")) >= 2, phase
        assert [a for a in answers if a.status != (302 if a.kind == "click" else 200)] == [], phase
        conversions = [a.body for a in load.of(phase, "conversion")]
        assert [c for c in conversions if "fraud_unavailable" in c["reasons"]] == [], phase
        clicks = await clicks_of(world, load.of(phase, "click"))
        assert [c for c in clicks if "fraud_unavailable" in c.reasons] == [], phase
    # 3: refused by fraud, still answered and recorded (fail-open) while the gateway's connection lasts;
    refused = load.of("foreign") + load.of("foreign, refused")
    assert [a for a in refused if a.status != (302 if a.kind == "click" else 200)] == []
    unjudged = [a.body for a in refused if a.kind == "conversion" and "fraud_unavailable" in a.body["reasons"]]
    assert unjudged and {c["status"] for c in unjudged} == {"flagged"}
    after_refusal = load.of("foreign, refused", "click")
    assert {a.decision for a in after_refusal} == {"flagged"}
    for click in await clicks_of(world, after_refusal):
        assert click.decision == pb.CLICK_DECISION_FLAGGED and "fraud_unavailable" in click.reasons, click
    # then, on the gateway's new connection, 503 and nothing else.
    unavailable = [a for a in load.of("gateway renewed") if a.status != (302 if a.kind == "click" else 200)]
    assert unavailable and all(a.status == 503 and a.body["error"]["code"] == "unavailable" for a in unavailable)
    # Healed: the gateway's connection made again, every answer good and judged by the fraud service.
    healed = load.of("healed, judged")
    assert [a for a in healed if a.status != (302 if a.kind == "click" else 200)] == []
    for click in await clicks_of(world, load.of("healed, judged", "click")):
        assert "fraud_unavailable" not in click.reasons, click


async def _scenario(world: World, load: Load) -> None:
    stack, files, http = world.stack, world.files, world.http
    ports = {"fraud": stack.ports.fraud, "attribution": stack.ports.attribution}
    metrics = {"fraud": stack.ports.fraud_metrics, "attribution": stack.ports.attribution_metrics,
               "gateway": stack.ports.gateway_metrics}

    async def answered(kind: str, phase: str, ok: Callable[[Answer], bool], count: int = 1) -> bool:
        return sum(1 for a in load.of(phase, kind) if ok(a)) >= count

    # 1. Traffic flows under mutual TLS on both hops.
    await until("clicks and conversions before the rotation", lambda: answered(
        "conversion", "before", lambda a: a.status == 200, 2), load)

    # 2. Renewal: every service's pair replaced by a new one of the same CA.
    load.phase = "renewed"
    # The click streams of both client hops, before the renewal.
    click_streams = {"attribution": "CheckClickStream", "gateway": "RecordClickStream"}
    streams_before = {
        name: await streams_started(http, metrics[name], method) for name, method in click_streams.items()
    }
    renewed = {name: issue(world.ours, name, HOST, days=7) for name in GRPC_SERVICES}
    renewed["gateway"] = issue(world.ours, "gateway", days=7)
    for name, leaf in renewed.items():
        files[name].install(leaf)
    for name in GRPC_SERVICES:
        async def serves_renewed(name: str = name) -> bool:
            return await asyncio.to_thread(presented, ports[name], world.operator) == (renewed[name].serial, True)
        await until(f"{name} presents its renewed certificate to a new connection", serves_renewed, load)
    for name, port in metrics.items():
        async def metric_follows(name: str = name, port: int = port) -> bool:
            return await expiry_metric(http, port) == renewed[name].not_after
        await until(f"{name}'s expiry metric shows the renewed certificate", metric_follows, load)
    # The clients made new channels with their renewed pairs (the gateway's metric above says so too).
    for name in ("attribution", "gateway"):
        async def channel_remade(name: str = name) -> bool:
            return reloads(stack, name) == 1
        await until(f"{name}'s client channels remade with the renewed pair", channel_remade, load)
        # ...and its click stream moved to the new channel at its next batch, not at
        # its 30 s renewal (a stream left on the old one would show the old pair).
        remade_at = time.monotonic()
        async def stream_moved(name: str = name) -> bool:
            return await streams_started(http, metrics[name], click_streams[name]) > streams_before[name]
        await until(f"{name}'s click stream opened again on the new channel", stream_moved, load)
        assert time.monotonic() - remade_at < 5.0, f"{name}'s click stream moved only at its renewal"
    # Traffic after every process has reloaded.
    mark = len(load.of("renewed", "conversion"))
    await until("conversions after the renewal", lambda: answered(
        "conversion", "renewed", lambda a: True, mark + 2), load)

    # 3. Attribution's pair from another CA, the bundles unchanged: the peers refuse it.
    load.phase = "foreign"
    stranger = trustme.CA()
    foreign = issue(stranger, "attribution", HOST, days=30)
    files["attribution"].install(foreign)

    async def serves_foreign() -> bool:
        return await asyncio.to_thread(presented, ports["attribution"], world.operator) == (foreign.serial, False)
    await until("attribution presents the foreign certificate, which our CA does not verify", serves_foreign, load)
    # The fraud service refuses attribution's new client certificate: fail-open.
    await until("a conversion flagged fraud_unavailable", lambda: answered(
        "conversion", "foreign", lambda a: a.status == 200 and "fraud_unavailable" in a.body["reasons"]), load)

    async def remade_again() -> bool:
        return reloads(stack, "attribution") == 2
    await until("attribution's client channels remade with the foreign pair", remade_again, load)
    # Clicks from now on fail open too: the fraud client sees its new channel refused
    # (TRANSIENT_FAILURE) and sends no batch (the stream's move is step 2's check).
    load.phase = "foreign, refused"
    await until("clicks after the refusal", lambda: answered("click", "foreign, refused", lambda a: True, 3), load)
    # The gateway refuses attribution's certificate on its next connection (made when its own pair renews).
    load.phase = "gateway renewed"
    files["gateway"].install(issue(world.ours, "gateway", days=5))
    await until("the gateway answers 503 unavailable", lambda: answered(
        "click", "gateway renewed", lambda a: a.status == 503, 2), load)
    assert await readyz(http, stack) == (503, "unavailable")

    # Healing: a good pair for attribution again; no restart.
    load.phase = "healed"
    good = issue(world.ours, "attribution", HOST, days=30)
    files["attribution"].install(good)

    async def serves_good() -> bool:
        return await asyncio.to_thread(presented, ports["attribution"], world.operator) == (good.serial, True)
    await until("attribution presents the good certificate again", serves_good, load)
    await until("conversions judged by the fraud service again", lambda: answered(
        "conversion", "healed", lambda a: a.status == 200 and "fraud_unavailable" not in a.body["reasons"], 2), load)
    # Attribution's client channel made again with the good pair: clicks from now on judged too.
    load.phase = "healed, judged"
    await until("clicks after the healing", lambda: answered("click", "healed, judged", lambda a: True, 3), load)
    assert await readyz(http, stack) == (200, "serving")
