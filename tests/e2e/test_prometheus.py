"""A real Prometheus scrapes the three services during a short load, and PromQL counts what was sent.

The Prometheus server and promtool are Debian's ``prometheus`` package (CI
installs it); without them the test skips, saying so. The same test checks
each service's real /metrics page with ``promtool check metrics`` and that
no ``*_created`` series is exposed, and that the alert rules load.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from tests.e2e.world import LiveWorld
from tools.stack import HOST, Stack, free_port

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
INSTALL_HINT = "Prometheus is not installed: apt-get install prometheus (Debian's package has prometheus and promtool)"

# Checked before the stack starts, so a machine without Prometheus skips at once.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("prometheus") is None, reason=INSTALL_HINT)]
SCRAPE_SECONDS = 1
CLICKS = 24
AMOUNTS = ("49.90", "12.00", "100.00", "7.35", "19.99", "250.00", "3.10", "64.00")
PAYOUT = 5.0  # world.setup_campaign's payout_micros


def gateway_metrics_port(stack: Stack) -> int:
    """The gateway's /metrics port: its own once the stack allocates one, else the tracking port.

    The one place that knows; the gateway's metrics move to
    ASCRIBE_GATEWAY_METRICS_PORT (tools/stack.py's ``Ports.gateway_metrics``).
    """
    return int(getattr(stack.ports, "gateway_metrics", stack.ports.gateway))


def scrape_targets(stack: Stack) -> dict[str, int]:
    return {
        "fraud": stack.ports.fraud_metrics,
        "attribution": stack.ports.attribution_metrics,
        "gateway": gateway_metrics_port(stack),
    }


class Prometheus:
    """A Prometheus server of our own on a free port, stopped with the test."""

    def __init__(self, binary: str, work: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"{HOST}:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        config_file = work / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self.log = work / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address={HOST}:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                async with http.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"Prometheus did not become ready:\n{self.log.read_text()[-4000:]}")

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def value(self, http: aiohttp.ClientSession, query: str) -> float:
        """The single value of an instant query (NaN when it has no result)."""
        data = await self.api(http, "query", query=query)
        results = data["result"]
        assert len(results) <= 1, (query, results)
        return float(results[0]["value"][1]) if results else math.nan


@pytest.fixture
async def prometheus(live: LiveWorld, tmp_path: Path) -> AsyncIterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary is not None, INSTALL_HINT
    server = Prometheus(binary, tmp_path, scrape_targets(live.stack))
    try:
        await server.wait_ready(live.http)
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def settle(read: Callable[[], Awaitable[float]], expected: float, timeout: float = 30.0) -> float:
    """Reads until the value equals ``expected`` (scrapes catch up) or the time is up; returns the last."""
    deadline = time.monotonic() + timeout
    value = await read()
    while not math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-6) and time.monotonic() < deadline:
        await asyncio.sleep(SCRAPE_SECONDS / 2)
        value = await read()
    return value


async def test_prometheus_counts_what_was_sent(live: LiveWorld, prometheus: Prometheus) -> None:
    http = live.http
    campaign = await live.setup_campaign()
    catalog: Any = live.catalog  # grpc's stubs type aio calls as if they were blocking
    await catalog.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff-a", name="A", channel="social")), timeout=10
    )

    clicks = await asyncio.gather(*(
        live.click(visitor_ip=f"203.0.113.{i + 1}", campaign_id="cmp", aff_id="aff-a", sub1="load")
        for i in range(CLICKS)
    ))
    assert [click.status for click in clicks] == [302] * CLICKS
    bad_clicks = 3  # answered 400 by the gateway, never reaching attribution
    for _ in range(bad_clicks):
        response = await live.click(campaign_id="")
        assert response.status == 400

    # Each order follows one of the clicks, so its affiliate earns the payout;
    # a minute later (a sale seconds after its click is fraud_ctit_too_short).
    occurred_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    postbacks = [
        live.postback(
            campaign.postback_token, campaign_id="cmp", order_id=f"order-{i}", amount=amount, currency="EUR",
            click_id=click.headers["X-Ascribe-Click-Id"], occurred_at=occurred_at,
        )
        for i, (amount, click) in enumerate(zip(AMOUNTS, clicks, strict=False))
    ]
    answers = await asyncio.gather(*postbacks)
    assert all(status == 200 for status, _ in answers), answers
    assert {body["status"] for _, body in answers} == {"pending"}, answers
    assert {body["payout"] for _, body in answers} == {f"{PAYOUT:.2f}"}, answers
    revenue = sum(float(amount) for amount in AMOUNTS)

    async def q(query: str) -> float:
        return await prometheus.value(http, query)

    expected = {
        # gateway
        'sum(ascribe_gateway_requests_total{job="gateway",route="/click",status="302"})': CLICKS,
        'sum(ascribe_gateway_requests_total{job="gateway",route="/click",status="400"})': bad_clicks,
        'sum(ascribe_gateway_requests_total{job="gateway",route="/postback"})': len(AMOUNTS),
        'sum(ascribe_gateway_clicks_total{job="gateway"})': CLICKS,
        'sum(ascribe_gateway_request_duration_seconds_count{job="gateway",route="/click"})': CLICKS + bad_clicks,
        # attribution
        'sum(ascribe_clicks_total{job="attribution"})': CLICKS,
        'sum(ascribe_conversions_total{job="attribution"})': len(AMOUNTS),
        'sum(ascribe_conversion_revenue_total{job="attribution",currency="EUR"})': revenue,
        'sum(ascribe_conversion_payout_total{job="attribution",currency="EUR"})': PAYOUT * len(AMOUNTS),
        'sum(ascribe_click_flush_rows_sum{job="attribution"})': CLICKS,
        # gRPC, with the conventional labels: the one CreateCampaign this test made
        'sum(grpc_server_started_total{job="attribution",grpc_type="unary",'
        'grpc_service="ascribe.attribution.v1.CatalogService",grpc_method="CreateCampaign"})': 1,
        'sum(grpc_server_handled_total{job="attribution",grpc_type="unary",'
        'grpc_service="ascribe.attribution.v1.CatalogService",grpc_method="CreateCampaign",grpc_code="OK"})': 1,
        'sum(grpc_server_handling_seconds_count{job="attribution",grpc_method="CreateCampaign"})': 1,
        # no RPC failed anywhere (no series at all)
        'sum(grpc_server_handled_total{grpc_code!="OK"})': math.nan,
        # fraud: every click and every conversion checked once
        'sum(ascribe_fraud_verdicts_total{job="fraud",event="click"})': CLICKS,
        'sum(ascribe_fraud_verdicts_total{job="fraud",event="conversion"})': len(AMOUNTS),
        # the stack as a whole
        'count(up == 1)': 3,
        'count(ascribe_build_info == 1)': 3,
        'ascribe_db_pool_max_connections{job="attribution"}': 20,
    }
    observed: dict[str, float] = {}
    for query, want in expected.items():
        if math.isnan(want):
            observed[query] = await q(query)
        else:
            observed[query] = await settle(functools.partial(q, query), want)
    mismatched = {
        query: (observed[query], want)
        for query, want in expected.items()
        if not (
            (math.isnan(want) and math.isnan(observed[query]))
            or math.isclose(observed[query], want, rel_tol=1e-9, abs_tol=1e-6)
        )
    }
    assert not mismatched, mismatched

    # Pool gauges agree with each other.
    in_use = await q('ascribe_db_pool_connections_in_use{job="attribution"}')
    open_now = await q('ascribe_db_pool_connections{job="attribution"}')
    assert 0 <= in_use <= open_now <= 20 and open_now >= 4  # ASCRIBE_DB_POOL_MIN's default

    # Every alert rule loaded and evaluated without error on real series.
    groups = (await prometheus.api(http, "rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 10
    assert {rule["health"] for rule in rules} == {"ok"}, [r for r in rules if r["health"] != "ok"]

    # The pages Prometheus scraped, as they are: no *_created series, promtool-clean.
    promtool = shutil.which("promtool")
    assert promtool is not None, INSTALL_HINT
    for job, port in scrape_targets(live.stack).items():
        async with http.get(f"http://{HOST}:{port}/metrics") as response:
            assert response.status == 200, job
            page = await response.read()
        assert b"_created" not in page, job
        assert b"grpc_server_handled_total" in page or job == "gateway", job
        checked = await asyncio.to_thread(
            subprocess.run, [promtool, "check", "metrics"], input=page, capture_output=True, timeout=30
        )
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
            job, checked.stdout.decode(), checked.stderr.decode(),
        )
