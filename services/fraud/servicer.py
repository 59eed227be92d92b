"""FraudService RPCs: proto <-> domain translation and input validation only."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import limits
from services.common.batch_stream import serve_batch_stream
from services.common.errors import DomainError, InvalidArgument, Unavailable, Violations
from services.common.ip import normalize_ip
from services.common.timestamps import in_range
from services.fraud import domain, metrics
from services.fraud.engine import FraudEngine
from services.fraud.store import Alert, valid_stream_id

R = TypeVar("R")
E = TypeVar("E")

Context = Any  # grpc.aio.ServicerContext: its deadline bounds the checks, WatchAlerts its stream

# The protos' limits (services.common.limits) are UTF-8 bytes; checked here as
# characters, which is never stricter, so whatever the attribution service
# accepted is accepted here too.
_KIND_BY_NUMBER = {kind.value: kind for kind in domain.CouponKind}
# Control characters (below the space); a regex search is C-fast where a
# per-character loop costs ~0.2 µs a character.
_CONTROL = re.compile(r"[\x00-\x1f]").search
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A check answers UNAVAILABLE this long before its caller's deadline (a tenth
# of it, at least 3 ms): the caller hears why (Redis did not answer) instead
# of DEADLINE_EXCEEDED.
_ANSWER_MARGIN_SECONDS = 0.003
_ANSWER_MARGIN_SHARE = 0.1


async def _within_deadline(context: Context, work: Awaitable[R]) -> R:
    """``work`` bounded by the call's own deadline, minus the margin to answer in."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return await work
    margin = max(_ANSWER_MARGIN_SECONDS, remaining * _ANSWER_MARGIN_SHARE)
    cm = asyncio.timeout(max(0.0, remaining - margin))
    try:
        async with cm:
            return await work
    except TimeoutError:
        if cm.expired():
            metrics.REDIS_ERRORS_TOTAL.inc()  # a hung Redis, as the socket timeout would have counted it
            raise Unavailable("the fraud state store (Redis) did not answer within the call's deadline") from None
        raise


class _Reader:
    """Validates one request's fields, naming them as ``requests[3].ip`` inside a batch."""

    def __init__(self, violations: Violations, prefix: str, now: datetime, max_future: timedelta) -> None:
        self.violations = violations
        self.prefix = prefix
        self.now = now
        self.latest = now + max_future

    def text(self, field: str, value: str, limit: int, *, required: bool = False) -> str:
        if len(value) > limit:
            self.violations.add(self.prefix + field, f"longer than {limit} characters")
        elif required and not value:
            self.violations.add(self.prefix + field, "is required")
        elif _CONTROL(value):
            self.violations.add(self.prefix + field, "contains control characters")
        return value

    def ip(self, field: str, value: str) -> str:
        if not value:
            return ""
        if len(value) > limits.IP:
            self.violations.add(self.prefix + field, f"longer than {limits.IP} characters")
            return ""
        canonical = normalize_ip(value.strip())
        if canonical is None:
            self.violations.add(self.prefix + field, f"not an IP address: {value[:limits.IP]!r}")
            return ""
        return canonical

    def time(self, field: str, message: Any, has: bool) -> datetime | None:
        if not has:
            return None
        stamp: Timestamp = message
        # What Timestamp.ToDatetime(tzinfo=UTC) does, without its Python overhead.
        seconds, nanos = stamp.seconds, stamp.nanos
        if not in_range(seconds, nanos):
            self.violations.add(self.prefix + field, "not a valid timestamp")
            return None
        try:
            value = _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
        except OverflowError:
            self.violations.add(self.prefix + field, "not a valid timestamp")
            return None
        if value > self.latest:
            self.violations.add(self.prefix + field, "is in the future")
            return None
        return value


def _click_event(request: pb.CheckClickRequest, read: _Reader) -> domain.ClickEvent:
    click_id = request.click_id
    external_click_id = request.external_click_id
    campaign_id = request.campaign_id
    affiliate_id = request.affiliate_id
    coupon_code = request.coupon_code
    user_agent = request.user_agent
    if (
        not campaign_id
        or len(click_id) > limits.CLICK_ID
        or len(external_click_id) > limits.EXTERNAL_CLICK_ID
        or len(campaign_id) > limits.CAMPAIGN_ID
        or len(affiliate_id) > limits.AFFILIATE_ID
        or len(coupon_code) > limits.COUPON_CODE
        or len(user_agent) > limits.USER_AGENT
        or _CONTROL(click_id + external_click_id + campaign_id + affiliate_id + coupon_code + user_agent)
    ):
        # Something is wrong with a text field: read field by field, so
        # every violation is named in order.
        return _checked_click_event(request, read)
    # The text fields are fine (the same checks as ``_Reader.text``, at once).
    ip = read.ip("ip", request.ip)
    occurred_at = (
        read.time("occurred_at", request.occurred_at, True) if request.HasField("occurred_at") else None
    )
    return domain.ClickEvent(
        click_id=click_id,
        external_click_id=external_click_id,
        campaign_id=campaign_id,
        affiliate_id=affiliate_id,
        coupon_code=coupon_code.upper(),
        ip=ip,
        user_agent=user_agent,
        occurred_at=occurred_at or read.now,
        code_missed=request.code_missed,
    )


def _checked_click_event(request: pb.CheckClickRequest, read: _Reader) -> domain.ClickEvent:
    return domain.ClickEvent(
        click_id=read.text("click_id", request.click_id, limits.CLICK_ID),
        external_click_id=read.text("external_click_id", request.external_click_id, limits.EXTERNAL_CLICK_ID),
        campaign_id=read.text("campaign_id", request.campaign_id, limits.CAMPAIGN_ID, required=True),
        affiliate_id=read.text("affiliate_id", request.affiliate_id, limits.AFFILIATE_ID),
        coupon_code=read.text("coupon_code", request.coupon_code, limits.COUPON_CODE).upper(),
        ip=read.ip("ip", request.ip),
        user_agent=read.text("user_agent", request.user_agent, limits.USER_AGENT),
        occurred_at=read.time("occurred_at", request.occurred_at, request.HasField("occurred_at")) or read.now,
        code_missed=request.code_missed,
    )


def _conversion_event(request: pb.CheckConversionRequest, read: _Reader) -> domain.ConversionEvent:
    kind = _KIND_BY_NUMBER.get(request.coupon_kind)
    if kind is None:
        read.violations.add(read.prefix + "coupon_kind", f"unknown coupon kind {request.coupon_kind}")
        kind = domain.CouponKind.NONE
    received_at = read.time("received_at", request.received_at, request.HasField("received_at")) or read.now
    occurred_at = read.time("occurred_at", request.occurred_at, request.HasField("occurred_at")) or received_at
    return domain.ConversionEvent(
        order_id=read.text("order_id", request.order_id, limits.ORDER_ID),
        campaign_id=read.text("campaign_id", request.campaign_id, limits.CAMPAIGN_ID, required=True),
        affiliate_id=read.text("affiliate_id", request.affiliate_id, limits.AFFILIATE_ID),
        click_id=read.text("click_id", request.click_id, limits.CLICK_ID),
        click_time=read.time("click_time", request.click_time, request.HasField("click_time")),
        coupon_code=read.text("coupon_code", request.coupon_code, limits.COUPON_CODE).upper(),
        coupon_kind=kind,
        customer_id=read.text("customer_id", request.customer_id, limits.CUSTOMER_ID),
        ip=read.ip("ip", request.ip),
        user_agent=read.text("user_agent", request.user_agent, limits.USER_AGENT),
        occurred_at=occurred_at,
        received_at=received_at,
        code_missed=request.code_missed,
    )


def _code_attempt(request: pb.CodeAttempt, read: _Reader) -> domain.CodeAttempt:
    return domain.CodeAttempt(
        campaign_id=read.text("campaign_id", request.campaign_id, limits.CAMPAIGN_ID, required=True),
        coupon_code=read.text("coupon_code", request.coupon_code, limits.COUPON_CODE).upper(),
        ip=read.ip("ip", request.ip),
        customer_id=read.text("customer_id", request.customer_id, limits.CUSTOMER_ID),
        missed=request.missed,
    )


_CLEAN_PROTO = pb.Verdict(action=pb.VerdictAction.ValueType(domain.CLEAN.action.value), score=domain.CLEAN.score)
_CLEAN_REPEAT_PROTO = pb.Verdict(
    action=pb.VerdictAction.ValueType(domain.CLEAN.action.value), score=domain.CLEAN.score, repeat_visit=True
)


def _verdict_proto(verdict: domain.Verdict) -> pb.Verdict:
    if verdict is domain.CLEAN:
        return _CLEAN_PROTO  # never mutated: gRPC serializes it, a batch copies it
    if verdict is domain.CLEAN_REPEAT:
        return _CLEAN_REPEAT_PROTO
    return pb.Verdict(
        action=pb.VerdictAction.ValueType(verdict.action.value),
        score=verdict.score,
        signals=[pb.Signal(code=s.code, detail=s.detail, weight=s.weight) for s in verdict.signals],
        repeat_visit=verdict.repeat_visit,
    )


def _alert_proto(alert: Alert) -> pb.Alert:
    message = pb.Alert(
        id=alert.id,
        kind=pb.AlertKind.ValueType(alert.kind),
        campaign_id=alert.campaign_id,
        coupon_code=alert.coupon_code,
        affiliate_id=alert.affiliate_id,
        ip=alert.ip,
        detail=alert.detail,
    )
    if alert.at is not None:
        message.at.FromDatetime(alert.at)
    return message


def _click_stream_reply(
    seq: int, answer: pb.VerdictBatch | None, error: DomainError | None
) -> pb.CheckClickStreamResponse:
    if error is not None:
        return pb.CheckClickStreamResponse(
            seq=seq, error=pb.StreamError(code=error.status.value[0], message=error.message)
        )
    return pb.CheckClickStreamResponse(seq=seq, batch=answer)


class FraudServicer(fraud_pb2_grpc.FraudServiceServicer):
    def __init__(
        self,
        engine: FraudEngine,
        *,
        max_batch: int,
        max_future_seconds: int,
        watch_block_ms: int,
        watch_reader: Callable[[str, int], Awaitable[list[Alert]]],
        watch_start: Callable[[], Awaitable[str]],
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._max_future = timedelta(seconds=max_future_seconds)
        self._watch_block_ms = watch_block_ms
        self._watch_reader = watch_reader
        self._watch_start = watch_start
        self.stopping = asyncio.Event()

    def _reader(self, violations: Violations, prefix: str = "") -> _Reader:
        return _Reader(violations, prefix, datetime.now(UTC), self._max_future)

    def _check_batch_size(self, size: int) -> None:
        if size > self._max_batch:
            raise InvalidArgument.one("requests", f"at most {self._max_batch} requests per batch, got {size}")

    async def CheckClick(self, request: pb.CheckClickRequest, context: Context) -> pb.Verdict:
        violations = Violations()
        event = _click_event(request, self._reader(violations))
        violations.raise_if_any()
        verdict = await _within_deadline(context, self._engine.check_click(event))
        return _verdict_proto(verdict)

    def _read_batch(self, requests: Sequence[R], read: Callable[[R, _Reader], E]) -> list[E]:
        """Every entry read, and every bad field of every entry named, before any check runs."""
        self._check_batch_size(len(requests))
        violations = Violations()
        reader = self._reader(violations)
        events = []
        for index, item in enumerate(requests):
            reader.prefix = f"requests[{index}]."
            events.append(read(item, reader))
        violations.raise_if_any()
        return events

    async def CheckClickBatch(self, request: pb.CheckClickBatchRequest, context: Context) -> pb.VerdictBatch:
        events = self._read_batch(request.requests, _click_event)
        verdicts = await _within_deadline(context, self._engine.check_clicks(events)) if events else []
        return pb.VerdictBatch(verdicts=[_verdict_proto(v) for v in verdicts])

    async def CheckClickStream(
        self, requests: AsyncIterator[pb.CheckClickStreamRequest], context: Context
    ) -> AsyncIterator[pb.CheckClickStreamResponse]:
        async for response in serve_batch_stream(
            requests, self._check_click_batch, _click_stream_reply, self.stopping, name="CheckClickStream"
        ):
            yield response

    async def _check_click_batch(self, request: pb.CheckClickBatchRequest) -> pb.VerdictBatch:
        return await self.CheckClickBatch(request, None)

    async def CheckConversion(self, request: pb.CheckConversionRequest, context: Context) -> pb.Verdict:
        violations = Violations()
        event = _conversion_event(request, self._reader(violations))
        violations.raise_if_any()
        verdict = await _within_deadline(context, self._engine.check_conversion(event))
        return _verdict_proto(verdict)

    async def CheckConversionBatch(
        self, request: pb.CheckConversionBatchRequest, context: Context
    ) -> pb.VerdictBatch:
        events = self._read_batch(request.requests, _conversion_event)
        verdicts = await _within_deadline(context, self._engine.check_conversions(events)) if events else []
        return pb.VerdictBatch(verdicts=[_verdict_proto(v) for v in verdicts])

    async def CheckCodeGuessing(
        self, request: pb.CheckCodeGuessingRequest, context: Context
    ) -> pb.CheckCodeGuessingResponse:
        self._check_batch_size(len(request.attempts))
        violations = Violations()
        reader = self._reader(violations)
        attempts = []
        for index, item in enumerate(request.attempts):
            reader.prefix = f"attempts[{index}]."
            attempts.append(_code_attempt(item, reader))
        violations.raise_if_any()
        states = await _within_deadline(context, self._engine.check_code_attempts(attempts)) if attempts else []
        return pb.CheckCodeGuessingResponse(
            states=[
                pb.GuessingState(
                    blocked=s.blocked,
                    retry_after_seconds=s.retry_after_seconds,
                    misses=s.misses,
                    address_blocked=s.address_blocked,
                    customer_blocked=s.customer_blocked,
                )
                for s in states
            ]
        )

    async def WatchAlerts(self, request: pb.WatchAlertsRequest, context: Context) -> AsyncIterator[pb.Alert]:
        after = request.after_id.strip()
        if after and not valid_stream_id(after):
            raise InvalidArgument.one("after_id", f"not an alert id: {after[:40]!r}")
        # Empty means "only new alerts": pin the current end of the stream now,
        # so nothing written between two reads is missed.
        last = after or await self._watch_start()
        while not self.stopping.is_set():
            # The bounded block keeps shutdown prompt: the loop looks at
            # ``stopping`` at least once per block.
            alerts = await self._watch_reader(last, self._watch_block_ms)
            for alert in alerts:
                last = alert.id
                yield _alert_proto(alert)
