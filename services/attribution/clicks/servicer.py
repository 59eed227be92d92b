"""The click side of TrackingService: proto <-> domain translation only.

The rules live in ``clicks``; this module turns requests into ClickInput,
outcomes and stored clicks into protos, and domain errors of one entry of a
RecordClickBatch into that entry's ``Error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.catalog.convert import device_type_to_proto
from services.attribution.clicks.recorder import ClickInput, ClickOutcome, ClickRecorder
from services.attribution.common.batch_errors import error_proto
from services.attribution.common.models import Click
from services.attribution.experiments.convert import arm_to_proto
from services.common.batch_stream import serve_batch_stream
from services.common.enum_words import EnumWords
from services.common.errors import DomainError, InvalidArgument
from services.common.timestamps import set_timestamp

_DECISIONS = EnumWords(pb.ClickDecision, "CLICK_DECISION_").by_word


def _occurred_at(request: pb.RecordClickRequest) -> datetime | None:
    if not request.HasField("occurred_at"):
        return None
    try:
        return request.occurred_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.one("occurred_at", "not a valid timestamp") from None


def click_input(request: pb.RecordClickRequest) -> ClickInput:
    return ClickInput(
        campaign_id=request.campaign_id,
        affiliate_id=request.affiliate_id,
        coupon_code=request.coupon_code,
        external_click_id=request.external_click_id,
        subs=(request.sub1, request.sub2, request.sub3, request.sub4, request.sub5),
        ip=request.ip,
        user_agent=request.user_agent,
        referer=request.referer,
        country=request.country,
        occurred_at=_occurred_at(request),
        vid=request.vid,
    )


def response_proto(outcome: ClickOutcome) -> pb.RecordClickResponse:
    return pb.RecordClickResponse(
        click_id=outcome.click_id,
        decision=_DECISIONS[outcome.decision],
        reasons=outcome.reasons,
        redirect_url=outcome.redirect_url,
    )


def _stream_reply(
    seq: int, answer: pb.RecordClickBatchResponse | None, error: DomainError | None
) -> pb.RecordClickStreamResponse:
    if error is not None:
        return pb.RecordClickStreamResponse(seq=seq, error=error_proto(error))
    return pb.RecordClickStreamResponse(seq=seq, batch=answer)


def click_proto(click: Click) -> pb.Click:
    sub1, sub2, sub3, sub4, sub5 = click.subs
    message = pb.Click(
        click_id=click.click_id,
        campaign_id=click.campaign_id,
        affiliate_id=click.affiliate_id,
        coupon_code=click.coupon_code or "",
        requested_coupon_code=click.requested_coupon_code or "",
        external_click_id=click.external_click_id or "",
        sub1=sub1,
        sub2=sub2,
        sub3=sub3,
        sub4=sub4,
        sub5=sub5,
        ip=click.ip or "",
        user_agent=click.user_agent or "",
        referer=click.referer or "",
        country=click.country or "",
        decision=_DECISIONS[click.decision],
        reasons=click.reasons,
        fraud_score=click.fraud_score,
        conversions=click.conversions,
        device_type=device_type_to_proto(click.device_type),
        experiment_arm=arm_to_proto(click.experiment_arm),
        experiment_id=click.experiment_id or "",
    )
    set_timestamp(message.occurred_at, click.occurred_at)
    # A click is received when its id is made: the id carries that time.
    set_timestamp(message.received_at, click.created_at)
    return message


class ClickRpcs:
    """Implements tracking_servicer.ClickSide."""

    def __init__(self, recorder: ClickRecorder) -> None:
        self._recorder = recorder
        self.stopping = asyncio.Event()

    async def record_click(self, request: pb.RecordClickRequest) -> pb.RecordClickResponse:
        return response_proto(await self._recorder.record(click_input(request)))

    async def record_click_batch(self, request: pb.RecordClickBatchRequest) -> pb.RecordClickBatchResponse:
        # Entries that fail translation keep their place in the answer.
        inputs: list[ClickInput] = []
        errors: dict[int, DomainError] = {}
        for index, entry in enumerate(request.requests):
            try:
                inputs.append(click_input(entry))
            except DomainError as error:
                errors[index] = error
        outcomes = iter(await self._recorder.record_many(inputs))
        results: list[pb.RecordClickResult] = []
        for index in range(len(request.requests)):
            result = errors[index] if index in errors else next(outcomes)
            if isinstance(result, DomainError):
                results.append(pb.RecordClickResult(error=error_proto(result)))
            else:
                results.append(pb.RecordClickResult(response=response_proto(result)))
        return pb.RecordClickBatchResponse(responses=results)

    async def record_click_stream(
        self, requests: AsyncIterator[pb.RecordClickStreamRequest]
    ) -> AsyncIterator[pb.RecordClickStreamResponse]:
        """RecordClickBatch per message; ends cleanly once ``stopping`` is set (see batch_stream)."""
        async for response in serve_batch_stream(
            requests, self.record_click_batch, _stream_reply, self.stopping, name="RecordClickStream"
        ):
            yield response

    async def get_click(self, request: pb.GetClickRequest) -> pb.Click:
        return click_proto(await self._recorder.get(request.click_id))

    async def close(self) -> None:
        """Drains the group commits in flight (their callers are waiting for them)."""
        await self._recorder.close()
