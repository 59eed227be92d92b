"""Interop: a Node client (@grpc/grpc-js + @grpc/proto-loader) drives the real stack.

tools/node/interop.js loads protos/ at run time, as a Node shop or dashboard
would, creates a campaign, an affiliate and a coupon, records a click and a
conversion, and reads them back; this test checks what it read, and reads the
same rows with the Python stubs. The stack runs with admin and internal tokens,
so the Node client's metadata is checked too. `make node-tools` installs the
npm packages (CI does); without node or them the test skips, saying which.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from tools.stack import REPO, Stack

NODE_TOOLS = REPO / "tools" / "node"
SCRIPT = NODE_TOOLS / "interop.js"
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
NODE_TIMEOUT_S = 60.0


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH (Debian: apt-get install nodejs npm; then make node-tools)"
    absent = [name for name in PACKAGES if not (NODE_TOOLS / "node_modules" / name / "package.json").is_file()]
    if absent:
        return f"{', '.join(absent)} not installed in tools/node/node_modules (run make node-tools)"
    return None


_MISSING = _missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MISSING is not None, reason=f"Node interop: {_MISSING}")]

ADMIN_TOKEN = f"admin-{secrets.token_hex(16)}"
INTERNAL_TOKEN = f"internal-{secrets.token_hex(16)}"


@pytest.fixture
async def stack(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
    redis_client: Any,
) -> AsyncIterator[Stack]:
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path,
        env={
            "ASCRIBE_IPINTEL_DIR": str(ipintel_dir),
            "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
            "ASCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "ASCRIBE_INTERNAL_TOKEN": INTERNAL_TOKEN,
            # A loaded CI machine can take longer than the production 50 ms to
            # answer a fraud check; a late answer would flag the click and the
            # conversion (fraud_unavailable) instead of the verdict under test.
            "ASCRIBE_FRAUD_DEADLINE_MS": "1000",
        },
    )
    await asyncio.to_thread(stack.start)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


async def run_node(addr: str, tokens: dict[str, str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of interop.js with only ``tokens`` of our settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ASCRIBE_")}
    process = await asyncio.create_subprocess_exec(
        "node", str(SCRIPT), "--addr", addr, env={**env, **tokens}, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_a_node_client_records_and_reads_back_a_click_and_a_conversion(stack: Stack) -> None:
    addr = stack.addr("attribution")
    # Its metadata counts: without the tokens the first admin RPC is refused.
    code, stdout, stderr = await run_node(addr, {})
    assert (code, stdout) == (1, ""), stderr
    assert "CreateCampaign: UNAUTHENTICATED (16)" in stderr, stderr

    code, stdout, stderr = await run_node(
        addr, {"ASCRIBE_ADMIN_TOKEN": ADMIN_TOKEN, "ASCRIBE_INTERNAL_TOKEN": INTERNAL_TOKEN}
    )
    assert code == 0, stderr
    out: dict[str, Any] = json.loads(stdout)
    created, read = out["created"], out["read"]

    click = read["click"]
    assert click["click_id"] == created["click"]["click_id"]
    assert click["decision"] == "CLICK_DECISION_ACCEPTED", click
    assert created["click"]["decision"] == "CLICK_DECISION_ACCEPTED"
    assert click["campaign_id"] == out["campaign_id"] and click["affiliate_id"] == out["affiliate_id"]
    assert click["coupon_code"] == out["code"] and click["sub1"] == "node" and click["ip"] == "203.0.113.9"
    assert click["conversions"] == 1

    conversion = read["conversion"]
    assert conversion["id"] == created["conversion"]["id"]
    assert conversion["status"] == "CONVERSION_STATUS_PENDING", conversion
    assert conversion["source"] == "ATTRIBUTION_SOURCE_CLICK" and conversion["affiliate_id"] == out["affiliate_id"]
    assert conversion["click_id"] == click["click_id"] and conversion["coupon_code"] == out["code"]
    # int64 as decimal strings: the money went over the wire exactly.
    assert conversion["amount_micros"] == "49900000" and conversion["payout_micros"] == "5000000"
    assert conversion["coupon_remaining"] == "4", conversion
    assert [event["to_status"] for event in conversion["history"]] == ["CONVERSION_STATUS_PENDING"]

    coupon = read["coupon"]
    assert created["coupon"]["remaining"] == "5"
    assert coupon["used"] == "1" and coupon["remaining"] == "4", coupon

    # What Node wrote, the Python stubs read the same.
    async with grpc.aio.insecure_channel(addr) as channel:
        metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
        tracking = attribution_pb2_grpc.TrackingServiceStub(channel)
        stored = await catalog.GetCoupon(
            pb.GetCouponRequest(campaign_id=out["campaign_id"], code=out["code"]), metadata=metadata, timeout=10
        )
        order = await tracking.GetConversion(
            pb.GetConversionRequest(campaign_id=out["campaign_id"], order_id=out["order_id"]),
            metadata=metadata, timeout=10,
        )
    assert (stored.used, stored.remaining, list(stored.affiliate_ids)) == (1, 4, [out["affiliate_id"]])
    assert order.status == pb.CONVERSION_STATUS_PENDING and order.amount_micros == 49_900_000
    assert order.customer_id.startswith("node-customer-") and order.currency == "EUR"

