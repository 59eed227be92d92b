"""The attribution service's client of the fraud sidecar, batched and fail-open.

Every check is coalesced with the checks of concurrent requests into one
``CheckClickBatch`` / ``CheckConversionBatch`` call (ARCHITECTURE.md section 8:
per-call overhead, not Redis, limits us). A caller waits at most the fraud
deadline in all, queueing included; past it, or when the fraud service fails,
it gets None and records the event as FLAGGED with ``fraud_unavailable``.
Fraud trouble never fails or loses an event.

The fraud deadline is shortened to what the RPC's caller has left
(services/common/deadlines.py): the wait, and the outgoing call, which runs
under the latest deadline of the callers in its batch. A caller with no time
left gets None at once and no call is made for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

from services.attribution.common.reasons import fraud_reason
from services.attribution.metrics import FRAUD_AVAILABLE, FRAUD_UNAVAILABLE_TOTAL
from services.common import deadlines
from services.common.batch_stream import BatchStream, StreamCallError, status_code
from services.common.batcher import MicroBatcher
from services.common.grpc_server import bearer_metadata
from services.common.metrics import GRPC_CLIENT_BATCH_SIZE
from services.common.timestamps import set_timestamp
from services.common.tls_channel import generation_of

logger = logging.getLogger(__name__)

# Requests per outgoing call; one caller's group is never split across calls
# unless it alone is larger than this.
MAX_CALL_REQUESTS = 1000

Verdicts = list[fraud_pb2.Verdict | None]


def fraud_reasons(verdict: fraud_pb2.Verdict) -> list[str]:
    """A verdict's signals as reason codes; a signal weighted 0 (switched off by the operator) is none."""
    return [fraud_reason(signal.code) for signal in verdict.signals if signal.weight > 0]


# A code's kind as the fraud service names it (its spread rules apply to UNIQUE codes).
FRAUD_COUPON_KIND = {
    "general": fraud_pb2.COUPON_KIND_GENERAL,
    "exclusive": fraud_pb2.COUPON_KIND_EXCLUSIVE,
    "unique": fraud_pb2.COUPON_KIND_UNIQUE,
}


def conversion_check(
    *,
    order_id: str,
    campaign_id: str,
    affiliate_id: str | None,
    click_id: str | None,
    click_time: datetime | None,
    coupon_code: str | None,
    coupon_kind: str | None,
    customer_id: str | None,
    ip: str,
    user_agent: str,
    occurred_at: datetime,
    received_at: datetime,
) -> fraud_pb2.CheckConversionRequest:
    """The fraud check of one conversion, as recorded or as re-scored later."""
    request = fraud_pb2.CheckConversionRequest(
        order_id=order_id,
        campaign_id=campaign_id,
        affiliate_id=affiliate_id or "",
        click_id=click_id or "",
        coupon_code=coupon_code or "",
        coupon_kind=FRAUD_COUPON_KIND[coupon_kind] if coupon_kind else fraud_pb2.COUPON_KIND_UNSPECIFIED,
        customer_id=customer_id or "",
        ip=ip,
        user_agent=user_agent,
    )
    set_timestamp(request.occurred_at, occurred_at)
    set_timestamp(request.received_at, received_at)
    if click_time is not None:
        set_timestamp(request.click_time, click_time)
    return request


def stream_verdicts(reply: fraud_pb2.CheckClickStreamResponse) -> fraud_pb2.VerdictBatch:
    """A CheckClickStream answer's verdicts, or its error raised as the call would have."""
    if reply.WhichOneof("result") == "error":
        raise StreamCallError(status_code(reply.error.code), reply.error.message)
    return reply.batch


class _BatchedCheck:
    """One batched RPC: groups of requests in, verdicts (or None) out."""

    def __init__(self, client: FraudClient, kind: str, method: str, call: Any, batch_type: Any) -> None:
        self._client = client
        self._method = method
        self._call = call
        self._batch_type = batch_type
        self._size = GRPC_CLIENT_BATCH_SIZE.labels(fraud_pb2.DESCRIPTOR.services_by_name["FraudService"].full_name, method)
        self._unavailable = FRAUD_UNAVAILABLE_TOTAL.labels(kind)
        # A group (a list of requests) is one batcher item, so the checks of
        # one caller's batch always travel together.
        self.batcher: MicroBatcher[Sequence[Any], Verdicts] = MicroBatcher(
            self._flush, max_batch=64, max_in_flight=1, name=f"fraud {method}"
        )

    async def check(self, requests: Sequence[Any]) -> Verdicts:
        if not requests:
            return []
        verdicts: Verdicts
        try:
            async with asyncio.timeout(max(0.0, deadlines.bound(self._client.deadline_seconds))):
                if len(requests) <= MAX_CALL_REQUESTS:
                    verdicts = await self.batcher.submit(requests)
                else:
                    chunks = [
                        requests[i : i + MAX_CALL_REQUESTS]
                        for i in range(0, len(requests), MAX_CALL_REQUESTS)
                    ]
                    parts = await asyncio.gather(*(self.batcher.submit(chunk) for chunk in chunks))
                    verdicts = [verdict for part in parts for verdict in part]
        except TimeoutError:
            verdicts = [None] * len(requests)
        missing = verdicts.count(None)
        if missing:
            self._unavailable.inc(missing)
        return verdicts

    async def _flush(self, groups: Sequence[Sequence[Any]]) -> list[Verdicts]:
        requests = [request for group in groups for request in group]
        self._size.observe(len(requests))
        verdicts: Sequence[fraud_pb2.Verdict | None]
        timeout = deadlines.bound(self._client.deadline_seconds)
        if timeout <= 0 or self._client.known_down():
            # Every caller in the batch has gone, or the call would fail at
            # once; skipping it keeps an outage cheap.
            return [[None] * len(group) for group in groups]
        try:
            response = await self._call(
                self._batch_type(requests=requests),
                timeout=timeout,
                metadata=self._client.metadata,
            )
            verdicts = list(response.verdicts)
            if len(verdicts) != len(requests):
                raise ValueError(f"{len(verdicts)} verdicts for {len(requests)} requests")
            FRAUD_AVAILABLE.set(1)
            self._client.log_available(self._method)
        except Exception as error:  # fail open: any failure means no verdict
            FRAUD_AVAILABLE.set(0)
            self._client.log_unavailable(self._method, error)
            verdicts = [None] * len(requests)
        results: list[Verdicts] = []
        start = 0
        for group in groups:
            results.append(list(verdicts[start : start + len(group)]))
            start += len(group)
        return results


class FraudClient:
    """Batched, deadline-bound, fail-open checks against the fraud service."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        deadline_ms: int,
        internal_token: str | None,
        *,
        click_stream: bool = True,
    ) -> None:
        self.deadline_seconds = deadline_ms / 1000
        self.metadata = bearer_metadata(internal_token)
        self._channel = channel
        stub = fraud_pb2_grpc.FraudServiceStub(channel)
        self._stub = stub
        # Click batches as messages on one CheckClickStream (batch_stream
        # explains why); conversions keep their unary calls.
        self._click_stream: BatchStream[fraud_pb2.CheckClickBatchRequest, fraud_pb2.VerdictBatch] | None = (
            None
        )
        click_call: Any = stub.CheckClickBatch
        if click_stream:
            self._click_stream = BatchStream(
                lambda: stub.CheckClickStream(metadata=self.metadata),
                lambda seq, batch, timeout_ms: fraud_pb2.CheckClickStreamRequest(
                    seq=seq, batch=batch, timeout_ms=timeout_ms
                ),
                stream_verdicts,
                self._check_click_batch,
                name="CheckClickStream",
                channel_generation=generation_of(channel),
            )
            click_call = self._send_click_stream
        self._clicks = _BatchedCheck(
            self, "click", "CheckClickBatch", click_call, fraud_pb2.CheckClickBatchRequest
        )
        self._conversions = _BatchedCheck(
            self,
            "conversion",
            "CheckConversionBatch",
            stub.CheckConversionBatch,
            fraud_pb2.CheckConversionBatchRequest,
        )
        self._last_logged: dict[str, str] = {}
        # Code guessing: the unknown codes of concurrent requests share one call.
        self._guesses: MicroBatcher[fraud_pb2.CodeAttempt, fraud_pb2.GuessingState | None] = MicroBatcher(
            self._flush_guesses, max_batch=MAX_CALL_REQUESTS, max_in_flight=2, name="fraud CheckCodeGuessing"
        )

    async def check_click(self, req: fraud_pb2.CheckClickRequest) -> fraud_pb2.Verdict | None:
        """The click's verdict; None when the fraud service is down or late."""
        return (await self._clicks.check((req,)))[0]

    async def check_clicks(self, reqs: Sequence[fraud_pb2.CheckClickRequest]) -> Verdicts:
        """Verdicts in request order (None for each one not judged in time); sent together."""
        return await self._clicks.check(reqs)

    async def check_conversion(self, req: fraud_pb2.CheckConversionRequest) -> fraud_pb2.Verdict | None:
        """The conversion's verdict; None when the fraud service is down or late."""
        return (await self._conversions.check((req,)))[0]

    async def check_conversions(self, reqs: Sequence[fraud_pb2.CheckConversionRequest]) -> Verdicts:
        """Verdicts in request order (None for each one not judged in time); sent together."""
        return await self._conversions.check(reqs)

    async def check_code_attempt(self, attempt: fraud_pb2.CodeAttempt) -> fraud_pb2.GuessingState | None:
        """Counts a tried code (when missed); its address's state. None when fraud is down or late (fail open)."""
        try:
            async with asyncio.timeout(max(0.0, deadlines.bound(self.deadline_seconds))):
                return await self._guesses.submit(attempt)
        except TimeoutError:
            FRAUD_UNAVAILABLE_TOTAL.labels("guessing").inc()
            return None

    async def _flush_guesses(
        self, attempts: Sequence[fraud_pb2.CodeAttempt]
    ) -> list[fraud_pb2.GuessingState | None]:
        timeout = deadlines.bound(self.deadline_seconds)
        if timeout <= 0 or self.known_down():
            return [None] * len(attempts)
        try:
            answer = await self._stub.CheckCodeGuessing(
                fraud_pb2.CheckCodeGuessingRequest(attempts=attempts),
                timeout=timeout,
                metadata=self.metadata,
            )
            if len(answer.states) != len(attempts):
                raise ValueError(f"{len(answer.states)} states for {len(attempts)} attempts")
            self.log_available("CheckCodeGuessing")
        except Exception as error:  # fail open: any failure means no answer
            self.log_unavailable("CheckCodeGuessing", error)
            return [None] * len(attempts)
        return list(answer.states)

    async def _check_click_batch(
        self, batch: fraud_pb2.CheckClickBatchRequest, timeout: float
    ) -> fraud_pb2.VerdictBatch:
        return await self._stub.CheckClickBatch(batch, timeout=timeout, metadata=self.metadata)

    async def _send_click_stream(
        self, batch: fraud_pb2.CheckClickBatchRequest, *, timeout: float, metadata: Any
    ) -> fraud_pb2.VerdictBatch:
        assert self._click_stream is not None
        return await self._click_stream.send(batch, timeout)

    def known_down(self) -> bool:
        """True while gRPC knows the fraud service is unreachable (it keeps reconnecting)."""
        state = self._channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            FRAUD_AVAILABLE.set(0)
            return True
        return False

    def log_unavailable(self, method: str, error: BaseException) -> None:
        # One line per change of failure, not one per batch: an outage at
        # thousands of clicks a second must not flood the log.
        if isinstance(error, grpc.aio.AioRpcError | StreamCallError):
            code = error.code().name
        else:
            code = type(error).__name__
        if self._last_logged.get(method) != code:
            self._last_logged[method] = code
            logger.warning("fraud service unavailable for %s (%s); failing open", method, code)

    def log_available(self, method: str) -> None:
        if self._last_logged.pop(method, None) is not None:
            logger.info("fraud service available again for %s", method)

    async def close(self) -> None:
        """Lets checks in flight finish (each is bounded by the deadline)."""
        await asyncio.gather(self._clicks.batcher.close(), self._conversions.batcher.close(), self._guesses.close())
        if self._click_stream is not None:
            await self._click_stream.close(timeout=self.deadline_seconds)
