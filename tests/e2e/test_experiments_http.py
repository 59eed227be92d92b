"""Issue #17's end-to-end proof: a 30 % holdout through the real gateway, attribution and fraud processes.

1,000 visitors from distinct addresses (X-Forwarded-For from a trusted
loopback peer, as the gateway believes it), a third of them clicking twice;
conversions at known rates per arm, realised exactly (the first round(rate *
n) units of each arm buy), so the truth the intervals must cover is known.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attribution.experiments.rules import arm_for, visitor_key
from services.common.timestamps import utcnow
from tests.e2e.world import BROWSER_UA, LiveWorld
from tests.support import TEST_REPORTS

pytestmark = pytest.mark.slow

VISITORS = 1_000
HOLDOUT = 30
TREATMENT_RATE = 0.12
CONTROL_RATE = 0.06
CONTAMINATED = 3  # control buyers who found the code anyway
HEALTH_BOUND_SECONDS = 0.3  # a first result quicker than twice this proves nothing


def address(i: int) -> str:
    """Distinct documentation and shared-space addresses (none on the datacenter or VPN lists)."""
    blocks = ("203.0.113", "198.51.100", "192.0.2", "100.64.7", "100.64.8")
    return f"{blocks[i // 250]}.{i % 250 + 1}"


async def test_a_30_percent_holdout_end_to_end(live: LiveWorld) -> None:
    campaign = await live.setup_campaign()
    await live.catalog.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff-a", name="A", channel="social")), timeout=10
    )
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id="cmp", code="SUMMER10", allow_all_affiliates=True)),
        timeout=10,
    )
    experiments = attribution_pb2_grpc.ExperimentServiceStub(live.channel)
    experiment = await experiments.CreateExperiment(
        pb.CreateExperimentRequest(
            experiment=pb.Experiment(campaign_id="cmp", coupon_code="SUMMER10", holdout_percent=HOLDOUT)
        ),
        timeout=10,
    )

    gate = asyncio.Semaphore(24)

    async def visit(i: int) -> tuple[str, str, bool]:
        """(click id, decision, whether the redirect carried the code); every third visitor clicks twice."""
        answers = []
        for _ in range(2 if i % 3 == 0 else 1):
            async with gate:
                response = await live.click(visitor_ip=address(i), ua=BROWSER_UA, campaign_id="cmp",
                                            aff_id="aff-a", coupon="SUMMER10")
            assert response.status == 302
            query = parse_qs(urlsplit(response.headers["Location"]).query)
            answers.append((response.headers["X-Ascribe-Click-Id"], response.headers["X-Ascribe-Decision"],
                            "coupon" in query))
        # Repeat clicks keep their arm.
        assert len({carried for _, _, carried in answers}) == 1, i
        return answers[0]

    visits = await asyncio.gather(*(visit(i) for i in range(VISITORS)))
    expected = [arm_for(experiment.id, visitor_key("", address(i), BROWSER_UA), HOLDOUT) for i in range(VISITORS)]
    in_arm = {"treatment": [], "control": []}  # type: dict[str, list[int]]
    for i, ((_, decision, carried), arm) in enumerate(zip(visits, expected, strict=True)):
        if decision == "rejected":
            assert carried  # joined no arm: the code as without an experiment
            continue
        # Control redirects never carry the code; treatment ones always do.
        assert carried == (arm == "treatment"), i
        in_arm[arm].append(i)
    joined = len(in_arm["treatment"]) + len(in_arm["control"])
    assert joined >= 0.95 * VISITORS  # browsers from clean addresses: hardly any rejected
    sd = math.sqrt(joined * HOLDOUT / 100 * (1 - HOLDOUT / 100))
    assert abs(len(in_arm["control"]) - joined * HOLDOUT / 100) <= 3 * sd

    # A crawler the fraud service rejects joins no arm, even with a vid the hash puts in control.
    bot_vid = next(f"bot{n}" for n in range(1000) if arm_for(experiment.id, f"bot{n}", HOLDOUT) == "control")
    bot = await live.click(visitor_ip="203.0.113.251", ua="Mozilla/5.0 (compatible; Googlebot/2.1; "
                           "+http://www.google.com/bot.html)", campaign_id="cmp", aff_id="aff-a", coupon="SUMMER10",
                           vid=bot_vid)
    assert bot.headers["X-Ascribe-Decision"] == "rejected"
    assert "coupon" in parse_qs(urlsplit(bot.headers["Location"]).query)
    assert (await live.get_click(bot.headers["X-Ascribe-Click-Id"])).experiment_arm == pb.EXPERIMENT_ARM_UNSPECIFIED

    # A control click as GetClick shows it.
    first_control = visits[in_arm["control"][0]][0]
    stored = await live.get_click(first_control)
    assert stored.experiment_arm == pb.EXPERIMENT_ARM_CONTROL and stored.coupon_code == ""
    assert "experiment_holdout" in stored.reasons

    # Orders a minute after their clicks (a sale seconds after its click is a fraud signal).
    occurred_at = (utcnow() + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    buyers = {
        "treatment": in_arm["treatment"][: round(TREATMENT_RATE * len(in_arm["treatment"]))],
        "control": in_arm["control"][: round(CONTROL_RATE * len(in_arm["control"]))],
    }
    live_orders = {"treatment": 0, "control": 0}

    async def buy(arm: str, n: int, i: int) -> None:
        params = {
            "campaign_id": "cmp", "order_id": f"o{i}", "amount": "40.00", "currency": "EUR",
            "click_id": visits[i][0], "occurred_at": occurred_at,
        }
        if arm == "treatment" or n < CONTAMINATED:
            params |= {"coupon": "SUMMER10", "discount": "4.00"}
        async with gate:
            status, body = await live.postback(campaign.postback_token, **params)
        assert status == 200, body
        if body["status"] in ("pending", "approved", "flagged"):
            live_orders[arm] += 1

    await asyncio.gather(*(buy(arm, n, i) for arm, units in buyers.items() for n, i in enumerate(units)))

    result = await experiments.GetExperimentResult(
        pb.GetExperimentResultRequest(experiment_id=experiment.id), timeout=30
    )
    arms = {a.arm: a for a in result.arms}
    treatment, control = arms[pb.EXPERIMENT_ARM_TREATMENT], arms[pb.EXPERIMENT_ARM_CONTROL]
    assert (treatment.units, control.units) == (len(in_arm["treatment"]), len(in_arm["control"]))
    assert (treatment.conversions, control.conversions) == (live_orders["treatment"], live_orders["control"])
    assert live_orders["treatment"] >= 0.9 * len(buyers["treatment"])
    assert control.contaminated_conversions == CONTAMINATED
    truth = TREATMENT_RATE - CONTROL_RATE
    lift = result.conversion_lift
    assert lift.fixed_ci_low <= truth <= lift.fixed_ci_high
    assert lift.ci_low <= truth <= lift.ci_high
    assert lift.ci_high - lift.ci_low > lift.fixed_ci_high - lift.fixed_ci_low
    revenue_truth = truth * 40_000_000
    assert result.revenue_lift.fixed_ci_low <= revenue_truth <= result.revenue_lift.fixed_ci_high
    assert result.revenue_lift.ci_low <= revenue_truth <= result.revenue_lift.ci_high
    line = (
        f"holdout e2e: units treatment {treatment.units}, control {control.units}; conversions "
        f"{treatment.conversions} / {control.conversions}; lift {lift.absolute:.4f} "
        f"fixed [{lift.fixed_ci_low:.4f}, {lift.fixed_ci_high:.4f}] always-valid [{lift.ci_low:.4f}, {lift.ci_high:.4f}]"
    )
    print(line)
    TEST_REPORTS.setdefault("experiments: the 30 % holdout end to end (issue #17)", []).append(line)

    # The same arm through GET /variant, with the campaign's token, for a unit id.
    async with live.http.get(
        f"{live.url}/variant", params={"experiment_id": experiment.id, "unit_id": "customer-7"},
        headers={"X-Ascribe-Token": campaign.postback_token},
    ) as response:
        assert response.status == 200
        body = await response.json()
    assert body["arm"] == arm_for(experiment.id, "customer-7", HOLDOUT)
    assert ("coupon" in body) == (body["arm"] == "treatment")
    async with live.http.get(
        f"{live.url}/variant", params={"experiment_id": experiment.id, "unit_id": "customer-7"},
        headers={"X-Ascribe-Token": "wrong"},
    ) as response:
        assert response.status == 401
    async with live.http.get(
        f"{live.url}/variant", params={"experiment_id": experiment.id}, headers={"X-Ascribe-Token": "x"}
    ) as response:
        assert response.status == 400 and (await response.json())["error"]["field"] == "unit_id"


async def test_the_first_result_does_not_stall_the_other_rpcs(live: LiveWorld) -> None:
    """The first result of a fresh process imports numpy and scipy (seconds on
    a busy machine): off the event loop, health checks answer meanwhile."""
    await live.setup_campaign()
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id="cmp", code="SUMMER10", allow_all_affiliates=True)),
        timeout=10,
    )
    experiments = attribution_pb2_grpc.ExperimentServiceStub(live.channel)
    experiment = await experiments.CreateExperiment(
        pb.CreateExperimentRequest(experiment=pb.Experiment(campaign_id="cmp", coupon_code="SUMMER10",
                                                            holdout_percent=HOLDOUT)),
        timeout=10,
    )
    health = health_pb2_grpc.HealthStub(live.channel)
    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # the channel is up

    started = time.perf_counter()
    result = asyncio.ensure_future(experiments.GetExperimentResult(
        pb.GetExperimentResultRequest(experiment_id=experiment.id), timeout=60
    ))
    slowest = 0.0
    try:
        while not result.done():
            sent = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            slowest = max(slowest, time.perf_counter() - sent)
            await asyncio.sleep(0.02)
        await result
    finally:
        result.cancel()
    took = time.perf_counter() - started
    if took < 2 * HEALTH_BOUND_SECONDS:
        pytest.skip(f"the first result took only {took:.2f} s: a stalled loop could not be told from a slow answer")
    # On the event loop, the import held the health checks for nearly all of it
    # (0.84 s of 0.89 s, measured): bounded by half of it, not by a fixed figure
    # a loaded machine's scheduling could break.
    assert slowest < took / 2, (slowest, took)
