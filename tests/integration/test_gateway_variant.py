"""GET /variant (issue #17) through the in-process gateway and attribution service: each answer the contract gives."""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp.test_utils import TestClient
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from services.attribution.experiments.rules import arm_for
from tests.integration.test_gateway import (  # noqa: F401  (fixtures)
    attribution,
    channel,
    create_campaign,
    gateway,
    json_error,
    make_gateway,
)


async def test_variant_answers_the_arm_once_per_unit_and_every_error_as_json(
    gateway: TestClient[Any, Any], channel: grpc.aio.Channel  # noqa: F811  (the fixtures imported above)
) -> None:
    campaign = await create_campaign(channel)
    await attribution_pb2_grpc.CatalogServiceStub(channel).CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id=campaign.id, code="SUMMER10", allow_all_affiliates=True))
    )
    experiments = attribution_pb2_grpc.ExperimentServiceStub(channel)
    experiment = await experiments.CreateExperiment(
        pb.CreateExperimentRequest(
            experiment=pb.Experiment(campaign_id=campaign.id, coupon_code="SUMMER10", holdout_percent=50)
        )
    )
    token = {"X-Ascribe-Token": campaign.postback_token}
    seen = set()
    for unit in ("u1", "u2", "u3", "u4", "u5", "u6", "u1"):
        response = await gateway.get("/variant", params={"experiment_id": experiment.id, "unit_id": unit},
                                     headers=token)
        assert response.status == 200, await response.text()
        body = await response.json()
        assert body["arm"] == arm_for(experiment.id, unit, 50)
        assert body.get("coupon") == ("SUMMER10" if body["arm"] == "treatment" else None)
        seen.add(body["arm"])
    result = await experiments.GetExperimentResult(pb.GetExperimentResultRequest(experiment_id=experiment.id))
    assert sum(a.units for a in result.arms) == 6  # u1 twice is one unit
    # The token as a parameter works too.
    response = await gateway.get(
        "/variant", params={"experiment_id": experiment.id, "unit_id": "u9", "token": campaign.postback_token}
    )
    assert response.status == 200

    query = {"experiment_id": experiment.id, "unit_id": "u1"}
    await json_error(await gateway.get("/variant", params=query), 401, "unauthenticated", "token")
    await json_error(await gateway.get("/variant", params=query, headers={"X-Ascribe-Token": "wrong"}),
                     401, "unauthenticated")
    await json_error(await gateway.get("/variant", params={"unit_id": "u1"}, headers=token),
                     400, "invalid_argument", "experiment_id")
    await json_error(await gateway.get("/variant", params={**query, "unit_id": "x" * 257}, headers=token),
                     400, "invalid_argument", "unit_id")
    await json_error(await gateway.get("/variant", params={**query, "experiment_id": "exp_nope"}, headers=token),
                     404, "not_found")
    await experiments.StopExperiment(pb.StopExperimentRequest(experiment_id=experiment.id))
    await json_error(await gateway.get("/variant", params=query, headers=token), 409, "failed_precondition")
