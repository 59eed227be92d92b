"""The HTTP gateway in-process against the real attribution service and PostgreSQL.

The gateway runs on an aiohttp test server (a real port on loopback) and
talks gRPC to the attribution service started in-process over this test's own
database. The fraud service is not started: the attribution service fails
open (FLAGGED, ``fraud_unavailable``) and the gateway shows fraud only as a
readiness detail. Cases that need a recording RPC skip, saying so, while the
attribution service still answers it UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from yarl import URL

from gateway.access_log import PathOnlyAccessLogger
from gateway.app import create_app
from gateway.config import Settings as GatewaySettings
from services.attribution.config import Settings as AttributionSettings
from services.attribution.server import AttributionService, start_attribution
from tests.support import attribution_settings as shared_attribution_settings
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
LANDING = "https://shop.example/summer?utm_source=affiliate&click_id=STALE"
SECRET_MARK = "s3cr3t-postback-token-do-not-log"


def attribution_settings(database_url: str) -> AttributionSettings:
    # Nothing listens at the fraud address: clicks and postbacks fail open (flagged).
    return shared_attribution_settings(
        database_url, f"127.0.0.1:{free_port()}", fraud_deadline_ms=50,
        db_pool_min=1, db_pool_max=8, db_statement_timeout_ms=5000,
    )


def gateway_settings(attribution_addr: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "attribution_addr": attribution_addr,
        "fraud_addr": f"127.0.0.1:{free_port()}",
        "deadline_ms": 5000,
        "health_deadline_ms": 300,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
async def attribution(database_url: str) -> AsyncIterator[AttributionService]:
    service = await start_attribution(attribution_settings(database_url))
    try:
        yield service
    finally:
        await service.stop(0.5)


@pytest.fixture
async def channel(attribution: AttributionService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{attribution.port}") as chan:
        yield chan


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Starts gateways on real loopback ports; each is closed after the test."""
    clients: list[TestClient[Any, Any]] = []

    async def make(attribution_addr: str, **overrides: Any) -> TestClient[Any, Any]:
        app = create_app(gateway_settings(attribution_addr, **overrides))
        # Access lines on, as an operator may switch them on: they must not carry tokens.
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(access_log_class=PathOnlyAccessLogger)
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def gateway(attribution: AttributionService, make_gateway: GatewayFactory) -> TestClient[Any, Any]:
    return await make_gateway(f"127.0.0.1:{attribution.port}")


@pytest.fixture
async def dead_gateway(make_gateway: GatewayFactory) -> TestClient[Any, Any]:
    """A gateway whose attribution service is not running at all."""
    return await make_gateway(f"127.0.0.1:{free_port()}", deadline_ms=1000)


async def json_error(
    response: ClientResponse, status: int, code: str, field: str | None = None
) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    if field is not None:
        assert body["error"]["field"] == field
    error: dict[str, Any] = body["error"]
    return error


# ---------------------------------------------------------------- catalog helpers


async def create_campaign(channel: grpc.aio.Channel, **fields: Any) -> pb.Campaign:
    stub = attribution_pb2_grpc.CatalogServiceStub(channel)
    values: dict[str, Any] = {
        "name": "Summer sale",
        "landing_url": LANDING,
        "currency": "EUR",
        "payout_micros": 5_000_000,
    }
    values.update(fields)
    campaign: pb.Campaign = await stub.CreateCampaign(
        pb.CreateCampaignRequest(campaign=pb.Campaign(**values))
    )
    return campaign


async def create_affiliate(channel: grpc.aio.Channel, name: str = "Affiliate A") -> pb.Affiliate:
    stub = attribution_pb2_grpc.CatalogServiceStub(channel)
    affiliate: pb.Affiliate = await stub.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(name=name, channel="influencer"))
    )
    return affiliate


# ---------------------------------------------------------------- health, readiness, metrics


async def test_healthz(gateway: TestClient[Any, Any]) -> None:
    response = await gateway.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_with_attribution_up_shows_fraud_only_as_a_detail(gateway: TestClient[Any, Any]) -> None:
    response = await gateway.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ready"
    assert body["checks"]["attribution"] == "serving"
    # The fraud service is not running: fail-open, so still ready.
    assert body["checks"]["fraud"] == "unavailable"


async def test_readyz_is_503_when_attribution_stops(
    attribution: AttributionService, gateway: TestClient[Any, Any]
) -> None:
    assert (await gateway.get("/readyz")).status == 200
    await attribution.stop(0.1)
    response = await gateway.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["attribution"] == "unavailable"


async def test_readyz_is_503_without_attribution(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.get("/readyz")
    assert response.status == 503
    assert (await response.json())["checks"]["attribution"] == "unavailable"


# ---------------------------------------------------------------- rejected before any RPC
# Against a gateway whose attribution service does not exist: a 400 (not a 503)
# proves the request was refused before any call went out.


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "campaign_id"),
        ("campaign_id=c1", "aff_id"),
        ("campaign_id=c1&aff_id=a1&sub1=" + "x" * 257, "sub1"),
        ("campaign_id=c1&aff_id=a1&sub2=%FF", "sub2"),
        ("campaign_id=c1&aff_id=a1&sub3=%ZZ", "sub3"),
        ("campaign_id=c1&aff_id=a1&coupon=" + "C" * 65, "coupon"),
    ],
)
async def test_bad_click_is_400_before_any_rpc(
    dead_gateway: TestClient[Any, Any], query: str, field: str
) -> None:
    # Encoded as given: the client must not repair a bad percent-encoding.
    response = await dead_gateway.get(URL("/click?" + query, encoded=True), allow_redirects=False)
    await json_error(response, 400, "invalid_argument", field)


async def test_oversize_user_agent_is_400(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.get(
        "/click?campaign_id=c1&aff_id=a1", headers={"User-Agent": "x" * 1025}, allow_redirects=False
    )
    await json_error(response, 400, "invalid_argument", "user_agent")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("order_id=o1&amount=1&token=t", "campaign_id"),
        ("campaign_id=c1&amount=1&token=t", "order_id"),
        ("campaign_id=c1&order_id=o1&amount=49.9.0&token=t", "amount"),
        ("campaign_id=c1&order_id=o1&amount=-1&token=t", "amount"),
        ("campaign_id=c1&order_id=o1&amount=1e3&token=t", "amount"),
        ("campaign_id=c1&order_id=o1&amount=1.0000001&token=t", "amount"),
        ("campaign_id=c1&order_id=o1&amount=1&currency=euro&token=t", "currency"),
        ("campaign_id=c1&order_id=o1&amount=1&occurred_at=2025-13-01T00:00:00Z&token=t", "occurred_at"),
        ("campaign_id=c1&order_id=o1&amount=1&device=phone&token=t", "device"),
        ("campaign_id=c1&order_id=o1&amount=1&ua=%C3&token=t", "ua"),
        ("campaign_id=c1&order_id=o1&amount=1&event=delete&token=t", "event"),
    ],
)
async def test_bad_postback_is_400_before_any_rpc(
    dead_gateway: TestClient[Any, Any], query: str, field: str
) -> None:
    response = await dead_gateway.get(URL("/postback?" + query, encoded=True))
    await json_error(response, 400, "invalid_argument", field)


async def test_bad_form_body_is_400(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.post(
        "/postback?campaign_id=c1",
        data=b"order_id=o1&amount=abc&token=t",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await json_error(response, 400, "invalid_argument", "amount")


async def test_a_malformed_multipart_body_is_400_not_try_again(dead_gateway: TestClient[Any, Any]) -> None:
    for body, content_type in [
        (b"garbage", "multipart/form-data; boundary=xyz"),
        (b"--xyz\r\nContent-Disposition: form-data\r\n\r\nv\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
        (b"x", "multipart/form-data"),
        (b"--xyz\r\nContent-Disposition: form-data; name=\"order_id\"\r\n"
         b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\no1\r\n--xyz--\r\n",
         "multipart/form-data; boundary=xyz"),
        (b"--xyz\r\nContent-Disposition: form-data; name=\"order_id\"\r\n"
         b"Content-Transfer-Encoding: x-weird\r\n\r\no1\r\n--xyz--\r\n",
         "multipart/form-data; boundary=xyz"),
    ]:
        response = await dead_gateway.post(
            "/postback?campaign_id=c1&order_id=o1&amount=1&token=t", data=body, headers={"Content-Type": content_type}
        )
        await json_error(response, 400, "malformed_body")


async def _raw(port: int, data: bytes, *, read_seconds: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), read_seconds)
    finally:
        writer.close()


async def test_what_aiohttp_cannot_parse_is_contract_json_that_echoes_nothing(
    dead_gateway: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    port = dead_gateway.port
    assert port is not None
    for garbage in [
        b"GET /click?campaign_id=<script>SECRET HTTP/1.1 extra\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03SECRET\r\n\r\n",  # TLS to the HTTP port
        b"POST /postback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz-SECRET\r\n\r\n",
    ]:
        answer = await _raw(port, garbage)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", answer[:200]
        assert b"application/json" in head.lower()
        assert b"SECRET" not in answer and b"script" not in answer
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request" and error["message"] == "malformed HTTP request"
    assert not any(record.exc_info for record in caplog.records)  # no traceback per request


async def test_a_body_that_never_arrives_is_408_within_the_body_timeout(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway(f"127.0.0.1:{free_port()}", body_timeout_ms=300)
    assert client.port is not None
    started = asyncio.get_running_loop().time()
    answer = await _raw(
        client.port,
        b"POST /postback?campaign_id=c1 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\norder_id=o1",
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert asyncio.get_running_loop().time() - started < 3


async def test_postback_without_token_is_401(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.get("/postback?campaign_id=c1&order_id=o1&amount=1")
    await json_error(response, 401, "unauthenticated", "token")


async def test_refund_must_be_posted(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.get("/postback?event=refund&campaign_id=c1&order_id=o1&token=t")
    await json_error(response, 405, "method_not_allowed", "event")


async def test_aiohttp_errors_are_json(dead_gateway: TestClient[Any, Any]) -> None:
    await json_error(await dead_gateway.get("/nowhere"), 404, "not_found")
    await json_error(await dead_gateway.delete("/click"), 405, "method_not_allowed")
    # A HEAD is no click (link previews probe with it).
    assert (await dead_gateway.head("/click?campaign_id=c1&aff_id=a1")).status == 405
    too_big = await dead_gateway.post(
        "/postback", data=b"x=" + b"y" * 70_000, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    await json_error(too_big, 413, "payload_too_large")
    other_type = await dead_gateway.post(
        "/postback?token=t", data=b"{}", headers={"Content-Type": "application/json"}
    )
    await json_error(other_type, 415, "unsupported_media_type")


# ---------------------------------------------------------------- attribution down


async def test_click_is_503_json_when_attribution_is_unreachable(dead_gateway: TestClient[Any, Any]) -> None:
    response = await dead_gateway.get("/click?campaign_id=c1&aff_id=a1", allow_redirects=False)
    error = await json_error(response, 503, "unavailable")
    assert "Location" not in response.headers
    assert "127.0.0.1" not in error["message"]  # no internal addresses in answers


async def test_postback_is_503_json_when_attribution_is_unreachable(
    dead_gateway: TestClient[Any, Any],
) -> None:
    response = await dead_gateway.post(
        "/postback",
        data={"campaign_id": "c1", "order_id": "o1", "amount": "49.90"},
        headers={"X-Ascribe-Token": "t"},
    )
    await json_error(response, 503, "unavailable")
    refund = await dead_gateway.post("/postback?event=refund&campaign_id=c1&order_id=o1&token=t")
    await json_error(refund, 503, "unavailable")


async def test_click_is_503_after_attribution_stops(
    attribution: AttributionService, gateway: TestClient[Any, Any]
) -> None:
    await attribution.stop(0.1)
    response = await gateway.get("/click?campaign_id=c1&aff_id=a1", allow_redirects=False)
    await json_error(response, 503, "unavailable")


async def test_postback_token_is_never_logged(
    dead_gateway: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await dead_gateway.get(f"/postback?campaign_id=c1&order_id=o1&amount=1&token={SECRET_MARK}")
    await dead_gateway.get(f"/postback?campaign_id=c1&order_id=o1&amount=x&token={SECRET_MARK}")
    await dead_gateway.post(
        "/postback?campaign_id=c1&order_id=o1&amount=1", headers={"X-Ascribe-Token": SECRET_MARK}
    )
    for record in caplog.records:
        assert SECRET_MARK not in record.getMessage()
        assert SECRET_MARK not in (record.exc_text or "")


# ---------------------------------------------------------------- clicks (need RecordClickBatch)


async def click_setup(channel: grpc.aio.Channel) -> tuple[pb.Campaign, pb.Affiliate]:
    campaign = await create_campaign(channel)
    affiliate = await create_affiliate(channel)
    return campaign, affiliate


async def test_click_redirects_to_the_landing_url(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign, affiliate = await click_setup(channel)
    response = await gateway.get(
        f"/click?campaign_id={campaign.id}&aff_id={affiliate.id}&sub1=s1&aff_click_id=x-1",
        allow_redirects=False,
    )
    assert response.status == 302, await response.text()
    location = response.headers["Location"]
    assert location.startswith("https://shop.example/summer?")
    query = parse_qs(urlsplit(location).query)
    click_id = response.headers["X-Ascribe-Click-Id"]
    assert query["click_id"] == [click_id]  # the stale one in the landing URL is replaced
    assert query["utm_source"] == ["affiliate"]
    assert "X-Ascribe-Decision" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"


async def test_no_parameter_changes_the_redirect_target(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign, affiliate = await click_setup(channel)
    response = await gateway.get(
        f"/click?campaign_id={campaign.id}&aff_id={affiliate.id}"
        "&url=https://evil.example/&redirect=https://evil.example/&landing_url=https://evil.example/",
        allow_redirects=False,
    )
    assert response.status == 302
    assert urlsplit(response.headers["Location"]).netloc == "shop.example"


async def test_debug_header_only_when_enabled(
    attribution: AttributionService, channel: grpc.aio.Channel, make_gateway: GatewayFactory
) -> None:
    campaign, affiliate = await click_setup(channel)
    debug = await make_gateway(f"127.0.0.1:{attribution.port}", debug_headers=True)
    response = await debug.get(
        f"/click?campaign_id={campaign.id}&aff_id={affiliate.id}", allow_redirects=False
    )
    assert response.status == 302
    # No fraud service runs here, so the attribution service fails open: flagged.
    assert response.headers["X-Ascribe-Decision"] == "flagged"


async def test_unknown_campaign_click_is_404(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    _, affiliate = await click_setup(channel)
    response = await gateway.get(f"/click?campaign_id=cmp_nope&aff_id={affiliate.id}", allow_redirects=False)
    await json_error(response, 404, "not_found")


async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    channel: grpc.aio.Channel, attribution: AttributionService, make_gateway: GatewayFactory
) -> None:
    campaign, affiliate = await click_setup(channel)
    stub = attribution_pb2_grpc.TrackingServiceStub(channel)
    url = f"/click?campaign_id={campaign.id}&aff_id={affiliate.id}"
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}

    trusting = await make_gateway(f"127.0.0.1:{attribution.port}")  # trusts 127.0.0.1 by default
    click_id = (await trusting.get(url, headers=headers, allow_redirects=False)).headers["X-Ascribe-Click-Id"]
    click = await stub.GetClick(pb.GetClickRequest(click_id=click_id))
    assert click.ip == "203.0.113.9"

    wary = await make_gateway(f"127.0.0.1:{attribution.port}", trusted_proxies=())
    click_id = (await wary.get(url, headers=headers, allow_redirects=False)).headers["X-Ascribe-Click-Id"]
    assert (await stub.GetClick(pb.GetClickRequest(click_id=click_id))).ip == "127.0.0.1"


async def test_many_concurrent_clicks_each_get_their_own_redirect(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign, affiliate = await click_setup(channel)

    async def one(n: int) -> str:
        response = await gateway.get(
            f"/click?campaign_id={campaign.id}&aff_id={affiliate.id}&sub1={n}", allow_redirects=False
        )
        assert response.status == 302, await response.text()
        return response.headers["X-Ascribe-Click-Id"]

    click_ids = await asyncio.gather(*(one(n) for n in range(50)))
    assert len(set(click_ids)) == 50


# ---------------------------------------------------------------- postbacks (need the conversion RPCs)


async def postback_setup(channel: grpc.aio.Channel, method: str = "RecordConversionBatch") -> pb.Campaign:
    campaign = await create_campaign(channel, hold_days=30)
    return campaign


async def test_postback_answers_the_conversion_as_json(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign = await postback_setup(channel)
    response = await gateway.get(
        f"/postback?campaign_id={campaign.id}&order_id=o-1&amount=49.90&currency=EUR"
        f"&token={campaign.postback_token}"
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["order_id"] == "o-1"
    assert body["campaign_id"] == campaign.id
    assert body["amount"] == "49.90"
    # No fraud service runs here: recorded, flagged for the fraud check it could not have.
    assert body["status"] == "flagged" and "fraud_unavailable" in body["reasons"]
    assert body["source"] == "none"  # no click, no code
    assert body["received_at"].endswith("Z")
    assert "amount_micros" not in body

    # The same order again, as a form POST with the token in the header: the same answer.
    again = await gateway.post(
        "/postback",
        data={"campaign_id": campaign.id, "order_id": "o-1", "amount": "49.90", "currency": "EUR"},
        headers={"X-Ascribe-Token": campaign.postback_token},
    )
    assert again.status == 200
    assert (await again.json())["id"] == body["id"]

    conflict = await gateway.get(
        f"/postback?campaign_id={campaign.id}&order_id=o-1&amount=50.00&currency=EUR"
        f"&token={campaign.postback_token}"
    )
    await json_error(conflict, 409, "already_exists")


async def test_postback_with_a_wrong_token_is_401(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign = await postback_setup(channel)
    response = await gateway.get(
        f"/postback?campaign_id={campaign.id}&order_id=o-2&amount=1&currency=EUR&token=wrong"
    )
    await json_error(response, 401, "unauthenticated")


async def test_postback_for_an_unknown_campaign_is_404(
    channel: grpc.aio.Channel, gateway: TestClient[Any, Any]
) -> None:
    campaign = await postback_setup(channel)
    response = await gateway.get(
        f"/postback?campaign_id=cmp_nope&order_id=o-3&amount=1&currency=EUR&token={campaign.postback_token}"
    )
    await json_error(response, 404, "not_found")


async def test_refund_through_the_gateway(channel: grpc.aio.Channel, gateway: TestClient[Any, Any]) -> None:
    campaign = await postback_setup(channel)
    token = campaign.postback_token
    created = await gateway.get(
        f"/postback?campaign_id={campaign.id}&order_id=o-4&amount=49.90&currency=EUR&token={token}"
    )
    assert created.status == 200
    assert (await created.json())["status"] == "flagged"  # no fraud service here

    partial = await gateway.post(
        f"/postback?event=refund&campaign_id={campaign.id}&order_id=o-4&refund_id=r1&amount=10.00",
        headers={"X-Ascribe-Token": token},
    )
    assert partial.status == 200, await partial.text()
    assert (await partial.json())["refunded"] == "10.00"

    too_much = await gateway.post(
        f"/postback?event=refund&campaign_id={campaign.id}&order_id=o-4&refund_id=r2&amount=100.00",
        headers={"X-Ascribe-Token": token},
    )
    await json_error(too_much, 400, "invalid_argument")

    unknown = await gateway.post(
        f"/postback?event=refund&campaign_id={campaign.id}&order_id=nope", headers={"X-Ascribe-Token": token}
    )
    await json_error(unknown, 404, "not_found")

    full = await gateway.post(
        f"/postback?event=refund&campaign_id={campaign.id}&order_id=o-4", headers={"X-Ascribe-Token": token}
    )
    assert full.status == 200
    assert (await full.json())["status"] == "reversed"


# ---------------------------------------------------------------- the real process


async def _wait_healthy(port: int, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            if process.returncode is not None:
                break
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not come up")


def _gateway_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ASCRIBE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "gen")])
    env.update(values)
    return env


async def test_sigterm_stops_the_gateway_cleanly() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        cwd=REPO,
        env=_gateway_env(ASCRIBE_GATEWAY_PORT=str(port), ASCRIBE_ATTRIBUTION_ADDR=f"127.0.0.1:{free_port()}"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_healthy(port, process)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0


async def test_bad_configuration_refuses_to_start() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        cwd=REPO,
        env=_gateway_env(ASCRIBE_GATEWAY_HOST="0.0.0.0", ASCRIBE_GATEWAY_PORT=str(free_port())),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 2
    assert b"ASCRIBE_INTERNAL_TOKEN" in stderr
