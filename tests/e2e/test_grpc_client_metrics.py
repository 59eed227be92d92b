"""The stack's outgoing gRPC calls on its metrics ports: gateway -> attribution, attribution -> fraud.

After a click and a postback through the real processes, each caller's
/metrics shows grpc_client_* for the service it called, with
go-grpc-prometheus's labels; the pages stay promtool-clean (when Debian's
prometheus package is installed; tests/e2e/test_prometheus.py checks the
same under load).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.world import LiveWorld
from tools.stack import HOST

pytestmark = pytest.mark.slow

TRACKING = "ascribe.attribution.v1.TrackingService"
FRAUD = "ascribe.fraud.v1.FraudService"


def page(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def client_calls(text: str) -> dict[str, dict[str, float]]:
    """{sample name: {grpc_service: summed value}} for the grpc_client_* samples of a page."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("grpc_client_"):
                assert {"grpc_type", "grpc_service", "grpc_method"} <= set(sample.labels), sample
                sums[sample.name][sample.labels["grpc_service"]] += sample.value
    return sums


async def test_outgoing_calls_show_on_the_callers_metrics_ports(live: LiveWorld) -> None:
    campaign = await live.setup_campaign()
    click = await live.click(campaign_id="cmp", aff_id="aff-a")
    assert click.status == 302
    occurred = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body = await live.postback(
        campaign.postback_token, campaign_id="cmp", order_id="o-1", amount="10.00", currency="EUR",
        click_id=click.headers["X-Ascribe-Click-Id"], occurred_at=occurred,
    )
    assert status == 200, body
    ports = live.stack.ports
    gateway_page, attribution_page = await asyncio.gather(
        asyncio.to_thread(page, ports.gateway_metrics), asyncio.to_thread(page, ports.attribution_metrics),
    )
    gateway, attribution = client_calls(gateway_page), client_calls(attribution_page)
    assert gateway["grpc_client_started_total"][TRACKING] >= 1
    assert gateway["grpc_client_handled_total"][TRACKING] >= 1
    assert gateway["grpc_client_handling_seconds_count"][TRACKING] >= 1
    assert attribution["grpc_client_started_total"][FRAUD] >= 1
    assert attribution["grpc_client_handled_total"][FRAUD] >= 1
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    for text in (gateway_page, attribution_page):
        checked = await asyncio.to_thread(
            subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
