"""ExperimentService: proto <-> domain translation for holdout experiments (issue #17).

Admin token for every RPC (the server's interceptor) except AssignVariant,
which shops call from their own servers: the campaign's postback token is
enough there, as for recording conversions, and the admin token also works.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

from services.attribution.catalog.cache import CatalogCache
from services.attribution.catalog.convert import decode_page_token, encode_page_token
from services.attribution.catalog.store import postback_token_matches
from services.attribution.experiments import rules, store
from services.attribution.experiments.assignment import ExperimentCache
from services.attribution.experiments.convert import (
    experiment_to_proto,
    optional_time,
    result_to_proto,
    segment_by_from_proto,
)
from services.common import limits
from services.common.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from services.common.grpc_server import presented_token, token_matches
from services.common.timestamps import utcnow

if TYPE_CHECKING:  # numpy and scipy load with the first result, not with the service (about 85 MB)
    from services.attribution.experiments.results import ExperimentOutcome

Context = grpc.aio.ServicerContext[Any, Any]

EXPERIMENT_ID_PREFIX = "exp_"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _experiment_id(value: str, field: str = "experiment_id") -> str:
    if not value:
        raise InvalidArgument.one(field, "required")
    if len(value.encode()) > limits.CAMPAIGN_ID or not value.isprintable():
        raise InvalidArgument.one(field, "not an experiment id")
    return value


class ExperimentServicer(attribution_pb2_grpc.ExperimentServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        experiments: ExperimentCache,
        catalog: CatalogCache,
        *,
        admin_token: str | None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._pool = pool
        self._experiments = experiments
        self._catalog = catalog
        self._admin_token = admin_token
        self._clock = clock

    async def CreateExperiment(self, request: pb.CreateExperimentRequest, context: Context) -> pb.Experiment:
        given = request.experiment
        now = self._clock()
        code, starts_at, mde = rules.validate_new(
            campaign_id=given.campaign_id,
            coupon_code=given.coupon_code,
            name=given.name,
            holdout_percent=given.holdout_percent,
            starts_at=optional_time(given.starts_at, given.HasField("starts_at"), "experiment.starts_at"),
            ends_at=optional_time(given.ends_at, given.HasField("ends_at"), "experiment.ends_at"),
            min_detectable_effect=given.min_detectable_effect,
            margin_percent=given.margin_percent if given.HasField("margin_percent") else None,
            now=now,
        )
        experiment = await store.insert_experiment(
            self._pool,
            rules.Experiment(
                id=EXPERIMENT_ID_PREFIX + secrets.token_urlsafe(12),
                campaign_id=given.campaign_id,
                coupon_code=code,
                name=given.name,
                holdout_percent=given.holdout_percent,
                starts_at=starts_at,
                ends_at=optional_time(given.ends_at, given.HasField("ends_at"), "experiment.ends_at"),
                min_detectable_effect=mde,
                margin_percent=given.margin_percent if given.HasField("margin_percent") else None,
                created_at=now,
            ),
            now,
        )
        self._experiments.invalidate()
        return experiment_to_proto(experiment, now)

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: Context) -> pb.Experiment:
        experiment = await store.get_experiment(self._pool, _experiment_id(request.experiment_id))
        return experiment_to_proto(experiment, self._clock())

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: Context
    ) -> pb.ListExperimentsResponse:
        if request.page_size < 0:
            raise InvalidArgument.one("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after: tuple[datetime, str] | None = None
        last = decode_page_token(request.page_token, "experiments")
        if last:
            created, _, last_id = last.partition("|")
            try:
                after = (datetime.fromisoformat(created), last_id)
            except ValueError:
                raise InvalidArgument.one("page_token", "not a page token of this listing") from None
        page = await store.list_experiments(self._pool, request.campaign_id, after, size + 1)
        now = self._clock()
        token = ""
        if len(page) > size:
            page = page[:size]
            token = encode_page_token("experiments", f"{page[-1].created_at.isoformat()}|{page[-1].id}")
        return pb.ListExperimentsResponse(
            experiments=[experiment_to_proto(e, now) for e in page], next_page_token=token
        )

    async def StopExperiment(self, request: pb.StopExperimentRequest, context: Context) -> pb.Experiment:
        now = self._clock()
        experiment = await store.stop_experiment(self._pool, _experiment_id(request.experiment_id), now)
        self._experiments.invalidate()
        return experiment_to_proto(experiment, now)

    async def AssignVariant(
        self, request: pb.AssignVariantRequest, context: Context
    ) -> pb.AssignVariantResponse:
        experiment_id = _experiment_id(request.experiment_id)
        rules.validate_unit_id(request.unit_id)
        if len(request.postback_token.encode()) > limits.POSTBACK_TOKEN:
            raise InvalidArgument.one("postback_token", f"longer than {limits.POSTBACK_TOKEN} bytes")
        # An unknown id is NOT_FOUND before any token check: ids carry 96 random
        # bits, so telling a shop its id is wrong leaks nothing worth guarding.
        experiment = await store.get_experiment(self._pool, experiment_id)
        await self._authorize(context, request.postback_token, experiment.campaign_id)
        now = self._clock()
        if not experiment.running_at(now):
            raise FailedPrecondition(f"experiment {experiment_id} is {experiment.status(now)}, not running")
        arm = rules.arm_for(experiment.id, request.unit_id, experiment.holdout_percent)
        await store.record_exposure(self._pool, experiment.id, request.unit_id, arm, now)
        return pb.AssignVariantResponse(
            experiment_id=experiment.id,
            unit_id=request.unit_id,
            arm=pb.EXPERIMENT_ARM_TREATMENT if arm == "treatment" else pb.EXPERIMENT_ARM_CONTROL,
            coupon_code=experiment.coupon_code if arm == "treatment" else "",
        )

    async def _authorize(self, context: Context, postback_token: str, campaign_id: str) -> None:
        """The campaign's postback token, or the admin token (when one is configured)."""
        if self._admin_token is not None and token_matches(
            presented_token(context.invocation_metadata()), self._admin_token
        ):
            return
        campaign = await self._catalog.campaign(campaign_id)
        if campaign is None or not postback_token_matches(postback_token, campaign.postback_token_sha256):
            raise Unauthenticated("missing or wrong postback token")

    async def GetExperimentResult(
        self, request: pb.GetExperimentResultRequest, context: Context
    ) -> pb.ExperimentResult:
        segment_by = segment_by_from_proto(request.segment_by)
        experiment = await store.get_experiment(self._pool, _experiment_id(request.experiment_id))
        # One snapshot: the aggregate and the currency read the same committed state.
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await store.result_aggregates(conn, experiment.id, segment_by)
            currency = await store.campaign_currency(conn, experiment.campaign_id)
        # In a worker thread: the first call imports numpy and scipy (about a
        # second), which on the event loop would hold every other RPC of the
        # replica that long; the statistics are CPU work too.
        outcome = await asyncio.to_thread(_outcome, experiment, rows, bool(segment_by))
        return result_to_proto(experiment, outcome, currency, self._clock())


def _outcome(experiment: rules.Experiment, rows: list[store.ArmAggregate], segmented: bool) -> ExperimentOutcome:
    # Imported here: numpy and scipy cost the service about 85 MB of RSS, paid
    # only once somebody asks for a result.
    from services.attribution.experiments import results

    return results.outcome(experiment, rows, segmented=segmented)
