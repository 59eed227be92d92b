"""TLS and mutual TLS on every gRPC hop, with certificates the tests make (trustme).

Servers come from ``start_server`` and channels from ``open_channel``, the
code every hop runs; the last test runs the real fraud and attribution
services over mutual TLS.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trustme
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attribution.server import start_attribution
from services.common.channels import Transport, open_channel
from services.common.env import ConfigError
from services.common.grpc_server import RunningServer, ServerInterceptor, start_server
from services.common.tls import CERT_EXPIRY, TlsSettings
from services.fraud.config import Settings as FraudSettings
from services.fraud.ipintel import IpIntelHolder
from services.fraud.server import start_fraud
from tests.support import attribution_settings, fraud_settings, ts

PEER = "/t.Peers/Peer"

def raw_unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary call of ``path`` sending and answering bytes as they are (identity serializers)."""
    return cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path))



@dataclass
class Pair:
    cert: Path
    key: Path


class Pki:
    """A CA and certificates issued by it, written as PEM files under ``root``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.ca = trustme.CA()
        self.ca_file = root / f"{name}-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, *identities: str, days: int = 30) -> Pair:
        leaf = self.ca.issue_cert(*identities, not_after=datetime.now(UTC) + timedelta(days=days))
        stem = self.root / f"{self.name}-{identities[0]}-{days}"
        pair = Pair(stem.with_suffix(".crt"), stem.with_suffix(".key"))
        pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(pair.key))
        return pair


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "ours")


def tls(pki: Pki, pair: Pair | None = None, *, client_auth: bool = False) -> Transport:
    return Transport(tls=TlsSettings(
        cert_file=pair.cert if pair else None, key_file=pair.key if pair else None,
        ca_file=pki.ca_file, client_auth=client_auth,
    ))


async def _peer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"ok"


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("t.Peers", {"Peer": grpc.unary_unary_rpc_method_handler(_peer)}),
    ))


async def _server(transport: Transport, **kwargs: Any) -> RunningServer:
    interceptor = ServerInterceptor({}, peer_identities=kwargs.pop("peer_identities", None))
    return await start_server(
        name="t", addr="127.0.0.1:0", service_names=[], register=_register, interceptor=interceptor,
        transport=transport, **kwargs,
    )


async def _call(port: int, transport: Transport | None) -> grpc.StatusCode:
    """The code a Peer call through a fresh channel ends with (a fresh channel: a new handshake)."""
    addr = f"127.0.0.1:{port}"
    channel = open_channel(addr, transport) if transport else grpc.aio.insecure_channel(addr)
    async with channel:
        try:
            await raw_unary(channel, PEER)(b"", timeout=3)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def _health(port: int, transport: Transport | None) -> int:
    addr = f"127.0.0.1:{port}"
    channel = open_channel(addr, transport) if transport else grpc.aio.insecure_channel(addr)
    async with channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        return int(answer.status)


@pytest.fixture
async def server_pair(pki: Pki) -> Pair:
    return pki.issue("localhost", "127.0.0.1")


async def test_a_plaintext_client_is_refused(pki: Pki, server_pair: Pair) -> None:
    running = await _server(tls(pki, server_pair))
    try:
        assert await _call(running.port, None) == grpc.StatusCode.UNAVAILABLE
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.OK
    finally:
        await running.stop(0)


async def test_a_client_certificate_from_another_ca_is_refused(
    pki: Pki, server_pair: Pair, tmp_path: Path
) -> None:
    other = Pki(tmp_path, "other")
    running = await _server(tls(pki, server_pair, client_auth=True))
    try:
        stranger = tls(pki, other.issue("attribution"), client_auth=True)
        assert await _call(running.port, stranger) == grpc.StatusCode.UNAVAILABLE
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.UNAVAILABLE  # no certificate at all
        ours = tls(pki, pki.issue("attribution"), client_auth=True)
        assert await _call(running.port, ours) == grpc.StatusCode.OK
    finally:
        await running.stop(0)


async def test_the_mtls_identity_is_checked_per_method(pki: Pki, server_pair: Pair) -> None:
    running = await _server(
        tls(pki, server_pair, client_auth=True), peer_identities={PEER: frozenset({"attribution"})}
    )
    try:
        attribution = tls(pki, pki.issue("attribution"), client_auth=True)
        gateway = tls(pki, pki.issue("gateway"), client_auth=True)
        assert await _call(running.port, attribution) == grpc.StatusCode.OK
        assert await _call(running.port, gateway) == grpc.StatusCode.PERMISSION_DENIED
        # Health stays open to any client the handshake accepts (the gateway's readiness probe).
        assert await _health(running.port, gateway) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(0)


def _expiry(label: str) -> float:
    for metric in CERT_EXPIRY.collect():
        for sample in metric.samples:
            if sample.labels == {"certificate": label}:
                return float(sample.value)
    raise AssertionError(f"no expiry sample for {label}")


async def test_a_renewed_certificate_is_served_without_a_restart(
    pki: Pki, server_pair: Pair, tmp_path: Path
) -> None:
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    live_ca = tmp_path / "live-ca.pem"
    live.cert.write_bytes(server_pair.cert.read_bytes())
    live.key.write_bytes(server_pair.key.read_bytes())
    live_ca.write_bytes(pki.ca_file.read_bytes())
    served = Transport(tls=TlsSettings(cert_file=live.cert, key_file=live.key, ca_file=live_ca))
    running = await _server(served)
    try:
        first_expiry = _expiry("certificate")
        assert abs(first_expiry - (datetime.now(UTC) + timedelta(days=30)).timestamp()) < 120
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.OK
        # The renewal: another CA's certificate, valid for 90 days, written over the files.
        renewed_pki = Pki(tmp_path, "renewed")
        renewed = renewed_pki.issue("localhost", "127.0.0.1", days=90)
        # A half-done rotation (the new certificate, the old key) is refused; the old pair stays.
        live.cert.write_bytes(renewed.cert.read_bytes())
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.OK
        assert _expiry("certificate") == first_expiry
        live.key.write_bytes(renewed.key.read_bytes())
        live_ca.write_bytes(renewed_pki.ca_file.read_bytes())
        assert await _call(running.port, tls(renewed_pki)) == grpc.StatusCode.OK
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.UNAVAILABLE
        assert abs(_expiry("certificate") - (datetime.now(UTC) + timedelta(days=90)).timestamp()) < 120
    finally:
        await running.stop(0)


async def test_clients_check_the_configured_server_name(pki: Pki) -> None:
    """A certificate naming the service, not the address dialled: ASCRIBE_TLS_SERVER_NAME."""
    running = await _server(tls(pki, pki.issue("fraud.internal")))
    try:
        assert await _call(running.port, tls(pki)) == grpc.StatusCode.UNAVAILABLE
        named = Transport(tls=replace(tls(pki).tls, server_name="fraud.internal"))
        assert await _call(running.port, named) == grpc.StatusCode.OK
    finally:
        await running.stop(0)


async def test_health_answers_plaintext_probes_on_its_own_port(pki: Pki, server_pair: Pair) -> None:
    running = await _server(tls(pki, server_pair), health_addr="127.0.0.1:0")
    try:
        assert running.health_port
        assert await _health(running.health_port, None) == health_pb2.HealthCheckResponse.SERVING
        # Only health there: nothing else is reachable without TLS.
        assert await _call(running.health_port, None) == grpc.StatusCode.UNIMPLEMENTED
        assert await _call(running.port, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


def test_tls_settings_fail_fast(pki: Pki, server_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ASCRIBE_"):
            monkeypatch.delenv(name)
    assert TlsSettings.from_env(serves=True) == TlsSettings()  # off unless set
    monkeypatch.setenv("ASCRIBE_TLS_CERT", str(server_pair.cert))
    monkeypatch.setenv("ASCRIBE_TLS_KEY", str(server_pair.key))
    with pytest.raises(ConfigError, match="ASCRIBE_TLS_CA"):
        TlsSettings.from_env(serves=True)
    monkeypatch.setenv("ASCRIBE_TLS_CA", str(pki.ca_file))
    assert TlsSettings.from_env(serves=True).enabled
    other = pki.issue("other")
    monkeypatch.setenv("ASCRIBE_TLS_KEY", str(other.key))  # not the certificate's key
    with pytest.raises(ConfigError, match="TLS files"):
        TlsSettings.from_env(serves=True)
    monkeypatch.delenv("ASCRIBE_TLS_CERT")
    monkeypatch.delenv("ASCRIBE_TLS_KEY")
    with pytest.raises(ConfigError, match="a server presents it"):
        TlsSettings.from_env(serves=True)
    assert TlsSettings.from_env(serves=False).enabled  # a gateway verifies servers with the CA alone
    monkeypatch.delenv("ASCRIBE_TLS_CA")
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ASCRIBE_FRAUD_ALLOWED_CLIENTS", "attribution")
    with pytest.raises(ConfigError, match="ASCRIBE_TLS_CLIENT_AUTH"):
        FraudSettings.from_env()


@pytest.fixture
async def mtls_services(
    pki: Pki, database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path,
    shared_intel: IpIntelHolder,
) -> AsyncIterator[tuple[int, int]]:
    fraud_transport = tls(pki, pki.issue("fraud", "127.0.0.1"), client_auth=True)
    fraud = await start_fraud(
        replace(fraud_settings(redis_server_url, redis_prefix, ipintel_dir),
                transport=fraud_transport, allowed_clients=frozenset({"attribution"})),
        handle_sighup=False, intel=shared_intel,
    )
    attribution_transport = tls(pki, pki.issue("attribution", "127.0.0.1"), client_auth=True)
    attribution = await start_attribution(attribution_settings(
        database_url, f"127.0.0.1:{fraud.port}", transport=attribution_transport
    ))
    try:
        yield attribution.port, fraud.port
    finally:
        await attribution.stop(0.5)
        await fraud.stop(0.5)


async def test_the_services_talk_over_mutual_tls(pki: Pki, mtls_services: tuple[int, int]) -> None:
    attribution_port, fraud_port = mtls_services
    gateway = tls(pki, pki.issue("gateway"), client_auth=True)
    async with open_channel(f"127.0.0.1:{attribution_port}", gateway) as channel:
        campaign = await attribution_pb2_grpc.CatalogServiceStub(channel).CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(
                name="Summer", landing_url="https://shop.example/", currency="EUR", payout_micros=1_000_000,
            )),
            timeout=10,
        )
        await attribution_pb2_grpc.CatalogServiceStub(channel).CreateAffiliate(
            pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff", name="aff", channel="social")), timeout=10
        )
        click = await attribution_pb2_grpc.TrackingServiceStub(channel).RecordClick(
            pb.RecordClickRequest(
                campaign_id=campaign.id, affiliate_id="aff", ip="203.0.113.9",
                user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
                occurred_at=ts(datetime.now(UTC)),
            ),
            timeout=10,
        )
    # Judged by the fraud service over the attribution -> fraud hop, not failed open.
    assert "fraud_unavailable" not in click.reasons
    assert click.decision == pb.CLICK_DECISION_ACCEPTED
    async with open_channel(f"127.0.0.1:{fraud_port}", gateway) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fraud_pb2_grpc.FraudServiceStub(channel).CheckClick(
                fraud_pb2.CheckClickRequest(campaign_id=campaign.id, click_id="c1"), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
