"""The gateway's /metrics lives on its own port; the tracking port answers it 404 (JSON) and serves /openapi.json.

In-process: the gateway app on a real loopback port, its metrics listener on
another, as ``python -m gateway`` wires them (tests/e2e/test_fresh_machine.py
checks the process itself). No attribution service: the routes used here
answer without one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import OPENAPI_JSON, create_app
from gateway.config import Settings
from gateway.metrics import metrics_listener
from tests.support import free_port


@dataclass
class Gateway:
    tracking: str
    metrics: str
    http: aiohttp.ClientSession


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    metrics_port = free_port()
    settings = Settings(
        attribution_addr=f"127.0.0.1:{free_port()}", fraud_addr=f"127.0.0.1:{free_port()}",
        metrics_port=metrics_port, health_deadline_ms=200,
    )
    app = create_app(settings)
    app.cleanup_ctx.append(metrics_listener(settings.metrics_host, metrics_port))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield Gateway(str(server.make_url("")), f"http://127.0.0.1:{metrics_port}", http)
    await server.close()


async def test_tracking_port_answers_metrics_404_in_the_json_error_shape(gateway: Gateway) -> None:
    for method in ("GET", "POST", "HEAD"):
        async with gateway.http.request(method, f"{gateway.tracking}/metrics") as response:
            assert response.status == 404, method
            if method != "HEAD":
                assert response.content_type == "application/json"
                body = await response.json()
                assert set(body) == {"error"} and body["error"]["code"] == "not_found"
                assert "ascribe_" not in await response.text()


async def test_metrics_port_serves_the_tracking_ports_counts(gateway: Gateway) -> None:
    async with gateway.http.get(f"{gateway.tracking}/healthz") as response:
        assert response.status == 200
    async with gateway.http.get(f"{gateway.tracking}/click") as response:
        assert response.status == 400
    async with gateway.http.get(f"{gateway.tracking}/metrics") as response:
        assert response.status == 404
    async with gateway.http.get(f"{gateway.metrics}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert 'ascribe_gateway_requests_total{route="/healthz",status="200"}' in text
    assert 'ascribe_gateway_requests_total{route="/click",status="400"}' in text
    # A probe of the old path is counted as an unknown route, not as a metrics route.
    assert 'ascribe_gateway_requests_total{route="other",status="404"}' in text
    assert 'route="/metrics"' not in text
    assert "ascribe_gateway_request_duration_seconds_bucket" in text
    # The metrics port serves nothing else: no tracking link answers there.
    async with gateway.http.get(f"{gateway.metrics}/click", allow_redirects=False) as response:
        assert response.status == 404


async def test_a_metrics_port_in_use_fails_the_start(gateway: Gateway) -> None:
    busy = int(gateway.metrics.rpartition(":")[2])
    app = create_app(Settings(attribution_addr=f"127.0.0.1:{free_port()}", fraud_addr=f"127.0.0.1:{free_port()}"))
    app.cleanup_ctx.append(metrics_listener("127.0.0.1", busy))
    server = TestServer(app, host="127.0.0.1")
    with pytest.raises(OSError):
        await server.start_server()
    await server.close()


async def test_openapi_is_served_on_the_tracking_port(gateway: Gateway) -> None:
    async with gateway.http.get(f"{gateway.tracking}/openapi.json") as response:
        assert response.status == 200 and response.content_type == "application/json"
        body = await response.read()
    assert body == OPENAPI_JSON
    assert json.loads(body)["openapi"] == "3.1.0"
    async with gateway.http.post(f"{gateway.tracking}/openapi.json") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    async with gateway.http.get(f"{gateway.metrics}/openapi.json") as response:
        assert response.status == 404
