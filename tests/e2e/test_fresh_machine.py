"""A fresh checkout's services as real processes: IP lists from the repository, gateway metrics on their port."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc

from services.fraud.ipintel import REPOSITORY_LISTS
from tools.stack import Stack, http_ok

pytestmark = pytest.mark.slow

TOR_IP = "101.99.92.179"  # in the snapshot's tor-exit-nodes.txt
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def test_fraud_loads_the_repository_lists_when_none_is_configured(
    database_url: str, redis_server_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """ASCRIBE_IPINTEL_DIR unset, nothing downloaded: Tor is flagged from the repository's snapshot alone."""
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path / "logs",
        env={
            "ASCRIBE_IPINTEL_DIR": "",  # empty is unset
            "ASCRIBE_DATA_DIR": str(tmp_path / "data"),  # no make ipintel download there
            "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
            "ASCRIBE_LOG_FORMAT": "json",
        },
    )
    with stack:
        stack.start(["fraud"])
        with grpc.insecure_channel(stack.addr("fraud")) as channel:
            verdict = fraud_pb2_grpc.FraudServiceStub(channel).CheckClick(
                pb.CheckClickRequest(click_id="c-1", campaign_id="camp", affiliate_id="aff", ip=TOR_IP,
                                     user_agent=BROWSER),
                timeout=5,
            )
        assert "tor_exit" in {s.code for s in verdict.signals}
        status, _, page = get(f"http://127.0.0.1:{stack.ports.fraud_metrics}/metrics")
    assert status == 200
    ages = dict(re.findall(r'^ascribe_fraud_ipintel_age_seconds\{list="(\w+)"\} (\S+)$', page, re.MULTILINE))
    assert set(ages) == {"tor", "datacenter", "vpn"}
    assert float(ages["tor"]) > 365 * 86400  # the snapshot's Tor list dates from 2024-02-27
    assert 0 < float(ages["datacenter"]) < float(ages["tor"])
    lines = [json.loads(line) for line in stack.log_path("fraud").read_text().splitlines() if line.startswith("{")]
    summary = [line for line in lines if line["msg"].startswith("IP lists from")]
    assert len(summary) == 1 and str(REPOSITORY_LISTS) in summary[0]["msg"]
    # Stale Tor list: a warning, so it reaches the console, saying how to refresh.
    assert summary[0]["level"] == "warning" and "make ipintel" in summary[0]["msg"]


def test_gateway_serves_metrics_on_its_own_port_only(
    database_url: str, redis_server_url: str, tmp_path: Path
) -> None:
    stack = Stack(database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path)
    assert stack.ports.gateway_metrics not in (stack.ports.gateway, stack.ports.fraud_metrics)
    with stack:
        # Alone the gateway is live, not ready (no attribution service): wait for /healthz.
        stack.start_service("gateway", wait=False)
        deadline = time.monotonic() + 30
        while not http_ok(f"{stack.gateway_url}/healthz"):
            assert time.monotonic() < deadline and stack.running("gateway"), stack.log_path("gateway").read_text()
            time.sleep(0.05)
        status, content_type, body = get(f"{stack.gateway_url}/metrics")
        assert (status, content_type.split(";")[0]) == (404, "application/json")
        assert json.loads(body)["error"]["code"] == "not_found"
        status, content_type, page = get(f"http://127.0.0.1:{stack.ports.gateway_metrics}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert 'ascribe_gateway_requests_total{route="other",status="404"} 1.0' in page
        assert 'ascribe_gateway_requests_total{route="/healthz",status="200"}' in page
