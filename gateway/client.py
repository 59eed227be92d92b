"""The gateway's calls to the attribution service (and a health probe of fraud).

One channel per target, made at start-up; a deadline on every call. Clicks
(and, by default, conversions) go through adaptive micro-batchers: a call goes
out at once when none is in flight, and requests that arrive meanwhile share
the next one. ARCHITECTURE.md section 8 shows why: per-call overhead, not the
database, limits a Python service here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.config import Settings
from gateway.metrics import CLICK_BATCH_SIZE, CONVERSION_BATCH_SIZE, UPSTREAM_ERRORS_TOTAL
from services.common import channels
from services.common.batch_stream import BatchStream, StreamCallError
from services.common.batcher import MicroBatcher
from services.common.channels import Transport
from services.common.grpc_server import bearer_metadata
from services.common.status_details import TOKEN_REFUSED, error_reason
from services.common.tls_channel import generation_of

logger = logging.getLogger(__name__)

# Not imported from services.attribution: the gateway must not load the
# attribution service (asyncpg and all) into its own process.
TRACKING_SERVICE = pb.DESCRIPTOR.services_by_name["TrackingService"].full_name

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
VALIDATION_MAX_BATCH = 256


class BackendError(Exception):
    """A failed attribution call, with what the HTTP answer needs."""

    def __init__(
        self, code: grpc.StatusCode, message: str, field: str | None = None, *, token_refused: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        # Our own ASCRIBE_INTERNAL_TOKEN was refused (the status's ErrorInfo
        # says so): the gateway is misconfigured, not its caller.
        self.token_refused = token_refused
        self.retry_after_seconds: int | None = None  # with RESOURCE_EXHAUSTED: when to try again


def _field_from_details(error: grpc.aio.AioRpcError) -> str | None:
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                if violation.field:
                    return str(violation.field)
    return None


def backend_error(error: grpc.aio.AioRpcError, method: str) -> BackendError:
    code = error.code()
    UPSTREAM_ERRORS_TOTAL.labels(method, code.name).inc()
    field = _field_from_details(error) if code is grpc.StatusCode.INVALID_ARGUMENT else None
    token_refused = code is grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == TOKEN_REFUSED
    return BackendError(code, error.details() or code.name.lower(), field, token_refused=token_refused)


def entry_error(error: pb.Error, method: str) -> BackendError:
    code = _CODES_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    UPSTREAM_ERRORS_TOTAL.labels(method, code.name).inc()
    return BackendError(code, error.message or code.name.lower(), error.field or None)


def _stream_batch(reply: pb.RecordClickStreamResponse) -> pb.RecordClickBatchResponse:
    """A RecordClickStream answer's batch, or its whole-message error as the gateway's BackendError."""
    if reply.WhichOneof("result") == "error":
        raise entry_error(reply.error, "RecordClickStream")
    return reply.batch


class AttributionClient:
    def __init__(
        self,
        settings: Settings,
        channel: grpc.aio.Channel,
        fraud_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._deadline = settings.deadline_seconds
        self._health_deadline = settings.health_deadline_seconds
        self._metadata = bearer_metadata(settings.internal_token)
        self._tracking = attribution_pb2_grpc.TrackingServiceStub(channel)
        self._catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
        # Concurrent checkouts share a call (ARCHITECTURE.md section 8's
        # adaptive batching); a short linger makes the batches worth a call at
        # moderate rates too, where each would otherwise go nearly alone.
        self._validations: MicroBatcher[pb.ValidateCouponRequest, pb.ValidateCouponResponse] = MicroBatcher(
            self._flush_validations, max_batch=VALIDATION_MAX_BATCH, max_in_flight=2, name="validation",
            min_interval=settings.validate_linger_ms / 1000,
        )
        self._experiments = attribution_pb2_grpc.ExperimentServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._fraud_health = health_pb2_grpc.HealthStub(fraud_channel) if fraud_channel else None
        self._clicks: MicroBatcher[pb.RecordClickRequest, pb.RecordClickResponse] = MicroBatcher(
            self._flush_clicks,
            max_batch=settings.click_max_batch,
            max_in_flight=settings.click_max_in_flight,
            size_histogram=CLICK_BATCH_SIZE,
            name="click",
            min_interval=settings.click_linger_ms / 1000,
            max_wait=settings.queue_budget_ms / 1000,
        )
        # Click batches as messages on one stream (batch_stream explains why).
        self._click_stream: BatchStream[pb.RecordClickBatchRequest, pb.RecordClickBatchResponse] | None = None
        if settings.click_stream:
            self._click_stream = BatchStream(
                lambda: self._tracking.RecordClickStream(metadata=self._metadata),
                lambda seq, batch, timeout_ms: pb.RecordClickStreamRequest(
                    seq=seq, batch=batch, timeout_ms=timeout_ms
                ),
                _stream_batch,
                self._record_click_batch,
                name="RecordClickStream",
                channel_generation=generation_of(channel),
            )
        self._conversions: MicroBatcher[pb.RecordConversionRequest, pb.Conversion] | None = None
        if settings.batch_conversions:
            self._conversions = MicroBatcher(
                self._flush_conversions,
                max_batch=settings.conversion_max_batch,
                max_in_flight=settings.conversion_max_in_flight,
                size_histogram=CONVERSION_BATCH_SIZE,
                name="conversion",
                min_batch_when_busy=settings.conversion_busy_min_batch,
                max_wait=settings.queue_budget_ms / 1000,
            )

    # ------------------------------------------------------------ recording

    async def record_click(self, request: pb.RecordClickRequest) -> pb.RecordClickResponse:
        return await self._clicks.submit(request)

    async def _flush_clicks(
        self, requests: Sequence[pb.RecordClickRequest]
    ) -> list[pb.RecordClickResponse | BaseException]:
        batch = pb.RecordClickBatchRequest(requests=requests)
        try:
            if self._click_stream is not None:
                answer = await self._click_stream.send(batch, self._deadline)
            else:
                answer = await self._record_click_batch(batch, self._deadline)
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "RecordClickBatch") from None
        except StreamCallError as error:
            UPSTREAM_ERRORS_TOTAL.labels("RecordClickStream", error.code().name).inc()
            raise BackendError(error.code(), error.details()) from None
        return [
            result.response
            if result.WhichOneof("result") == "response"
            else entry_error(result.error, "RecordClickBatch")
            for result in answer.responses
        ]

    async def _record_click_batch(
        self, batch: pb.RecordClickBatchRequest, timeout: float
    ) -> pb.RecordClickBatchResponse:
        return await self._tracking.RecordClickBatch(batch, timeout=timeout, metadata=self._metadata)

    async def record_conversion(self, request: pb.RecordConversionRequest) -> pb.Conversion:
        if self._conversions is not None:
            return await self._conversions.submit(request)
        try:
            return await self._tracking.RecordConversion(
                request, timeout=self._deadline, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "RecordConversion") from None

    async def _flush_conversions(
        self, requests: Sequence[pb.RecordConversionRequest]
    ) -> list[pb.Conversion | BaseException]:
        try:
            answer = await self._tracking.RecordConversionBatch(
                pb.RecordConversionBatchRequest(requests=requests),
                timeout=self._deadline,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "RecordConversionBatch") from None
        return [
            result.conversion
            if result.WhichOneof("result") == "conversion"
            else entry_error(result.error, "RecordConversionBatch")
            for result in answer.responses
        ]

    async def validate_coupon(self, request: pb.ValidateCouponRequest) -> pb.ValidateCouponResponse:
        """Checkout validation, coalesced with concurrent ones into one ValidateCouponBatch call."""
        return await self._validations.submit(request)

    async def _flush_validations(
        self, requests: Sequence[pb.ValidateCouponRequest]
    ) -> list[pb.ValidateCouponResponse | BaseException]:
        try:
            answer = await self._catalog.ValidateCouponBatch(
                pb.ValidateCouponBatchRequest(requests=requests), timeout=self._deadline, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "ValidateCouponBatch") from None
        results: list[pb.ValidateCouponResponse | BaseException] = []
        for result in answer.results:
            if result.WhichOneof("result") == "response":
                results.append(result.response)
                continue
            failed = entry_error(result.error, "ValidateCouponBatch")
            if failed.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                failed.retry_after_seconds = result.retry_after_seconds or None
            results.append(failed)
        return results

    async def reverse_conversion(self, request: pb.ReverseConversionRequest) -> pb.Conversion:
        try:
            return await self._tracking.ReverseConversion(
                request, timeout=self._deadline, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "ReverseConversion") from None

    async def assign_variant(self, request: pb.AssignVariantRequest) -> pb.AssignVariantResponse:
        """Experiments (issue #17): the token in the request is the campaign's; no internal token needed."""
        try:
            return await self._experiments.AssignVariant(request, timeout=self._deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, "AssignVariant") from None

    # ------------------------------------------------------------ health

    async def attribution_serving(self) -> bool:
        return await self._serving(self._health, TRACKING_SERVICE)

    async def fraud_serving(self) -> bool | None:
        """None when no fraud address is configured."""
        if self._fraud_health is None:
            return None
        return await self._serving(self._fraud_health, "")

    async def _serving(self, stub: health_pb2_grpc.HealthStub, service: str) -> bool:
        try:
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._health_deadline
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Lets queued and in-flight calls finish (each is bounded by its deadline)."""
        await self._clicks.close()
        if self._click_stream is not None:
            await self._click_stream.close(timeout=self._deadline)
        if self._conversions is not None:
            await self._conversions.close()
        await self._validations.close()


def open_channel(addr: str, transport: Transport) -> grpc.aio.Channel:
    """The shared factory's channel (keepalive, reconnect backoff, TLS: services/common/channels.py)."""
    return channels.open_channel(addr, transport)
