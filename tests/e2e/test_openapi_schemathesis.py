"""Schemathesis against the running gateway: every operation of gateway/openapi.json, no 5xx, answers as documented.

The three services run as real processes (the ``live`` fixture); schemathesis
reads the description from the gateway's own /openapi.json, so what is served
is what is checked. Its runs are seeded: a failure reproduces with the same
command (printed on failure), and the budget stays fixed (about 15 s here:
852 cases over the 5 operations).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.world import LiveWorld

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOOKS = "tests.e2e.schemathesis_hooks"
SEED = 20261206
# Cases per operation and phase: enough to reach every parameter and both
# methods of /postback, within a budget CI can afford.
MAX_EXAMPLES = 40


# Most generated ids name nothing, and every answer would be a 404 before the
# attribution service sees the rest: these draw the seeded campaign, affiliate
# and coupon (and a currency the campaign takes) often enough that clicks
# redirect and postbacks record, refund and conflict, fuzzed in every other
# parameter.
CONFIG = """
[dictionaries.campaigns]
values = ["cmp"]
[dictionaries.affiliates]
values = ["aff-a"]
[dictionaries.coupons]
values = ["SUMMER150", "summer150"]
[dictionaries.currencies]
values = ["EUR"]
[dictionaries.amounts]
values = ["49.90", "0.01"]
[dictionaries.orders]
values = ["order-1", "order-2"]

[parameters]
"query.campaign_id" = { dictionary = "campaigns", probability = 0.6 }
"body.campaign_id" = { dictionary = "campaigns", probability = 0.6 }
"query.aff_id" = { dictionary = "affiliates", probability = 0.6 }
"query.coupon" = { dictionary = "coupons", probability = 0.5 }
"body.coupon" = { dictionary = "coupons", probability = 0.5 }
"query.currency" = { dictionary = "currencies", probability = 0.6 }
"body.currency" = { dictionary = "currencies", probability = 0.6 }
"query.amount" = { dictionary = "amounts", probability = 0.6 }
"body.amount" = { dictionary = "amounts", probability = 0.6 }
"query.order_id" = { dictionary = "orders", probability = 0.6 }
"body.order_id" = { dictionary = "orders", probability = 0.6 }

# A request the description forbids must be refused: 400 naming the field,
# or, for a body past the gateway's 64 KiB (201 long SKUs), 413 before it is
# parsed; 404/409 are the attribution service's answers for what a
# missing optional value made unknown or conflicting.
[checks.negative_data_rejection]
expected-statuses = [400, 401, 404, 405, 409, 413, 415]
"""


async def seed(live: LiveWorld) -> str:
    """The campaign, affiliate and coupon CONFIG names; returns the campaign's postback token."""
    campaign = await live.setup_campaign()
    await live.catalog.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff-a", name="aff-a", channel="social")), timeout=10,
    )
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(
            campaign_id="cmp", code="SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
        )),
        timeout=10,
    )
    return campaign.postback_token


def schemathesis_command(url: str, token: str, config: Path, report: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
        "run", f"{url}/openapi.json",
        # not_a_server_error is replaced by the hooks' stricter
        # no_server_error (503 only when documented); the others are schemathesis's
        # conformance checks (status codes, content types, headers and bodies as
        # the description states them) and negative_data_rejection (what the
        # description forbids is refused). Not positive_data_acceptance: the
        # gateway refuses, rightly and naming the field, values the description
        # cannot express (control characters, a currency that is three letters
        # but not ISO 4217, query and body disagreeing, a refund sent by GET).
        "--checks", ",".join((
            "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance",
            "no_server_error", "errors_name_the_field", "negative_data_rejection",
        )),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--workers", "2", "--request-timeout", "10", "--max-redirects", "0",
        # A real campaign's token, so postbacks get past authentication to the
        # parameters (a fuzzed token is checked too: the header is generated).
        "--header", f"X-Ascribe-Token:{token}",
        "--continue-on-failure", "--output-truncate", "false",
        "--report", "junit", "--report-junit-path", str(report),
    ]


async def test_every_documented_operation_holds_to_the_description(live: LiveWorld, tmp_path: Path) -> None:
    token = await seed(live)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report = tmp_path / "junit.xml"
    command = schemathesis_command(live.url, token, config, report)
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        # The hooks module is imported by the CLI: from this checkout, however pytest was started.
        env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": os.pathsep.join((str(REPO), os.environ.get("PYTHONPATH", "")))},
    )
    output = result.stdout + result.stderr
    # The failures' descriptions come first, then reproducing requests that can be huge.
    shown = output if len(output) < 30_000 else f"{output[:15_000]}\n[...]\n{output[-10_000:]}"
    assert result.returncode == 0, f"{' '.join(command)}\n{shown}"
    answered = await asyncio.to_thread(gateway_answers, live)
    tested = {case.get("name") for case in ET.parse(report).getroot().iter("testcase")}
    assert tested >= {
        "GET /click", "GET /postback", "POST /postback", "GET /healthz", "GET /readyz",
    }, tested
    # The cases got past the parameters to the attribution service and back:
    # clicks redirected, postbacks recorded and conflicted, unknown campaigns
    # refused by the service (not only by the gateway's parsing).
    for route, status in (("/click", "302"), ("/postback", "200"), ("/postback", "409"), ("/postback", "404")):
        assert answered.get((route, status), 0) > 0, (route, status, answered)


def gateway_answers(live: LiveWorld) -> dict[tuple[str, str], float]:
    """ascribe_gateway_requests_total by (route, status), from the gateway's metrics port."""
    url = f"http://127.0.0.1:{live.stack.ports.gateway_metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "ascribe_gateway_requests"
        for sample in family.samples
        if sample.name == "ascribe_gateway_requests_total"
    }


