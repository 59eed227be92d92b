"""TrackingService: routes each RPC to the click or the conversion side.

Each side translates protos to its domain calls (clicks.servicer.ClickRpcs,
conversions.servicer.ConversionRpcs); this class only joins them into the one
gRPC service the contract names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc

Context = Any  # grpc.aio.ServicerContext; unused by the sides


class ClickSide(Protocol):
    async def record_click(self, request: pb.RecordClickRequest) -> pb.RecordClickResponse: ...
    async def record_click_batch(self, request: pb.RecordClickBatchRequest) -> pb.RecordClickBatchResponse: ...
    def record_click_stream(
        self, requests: AsyncIterator[pb.RecordClickStreamRequest]
    ) -> AsyncIterator[pb.RecordClickStreamResponse]: ...
    async def get_click(self, request: pb.GetClickRequest) -> pb.Click: ...


class ConversionSide(Protocol):
    async def record_conversion(self, request: pb.RecordConversionRequest) -> pb.Conversion: ...
    async def record_conversion_batch(
        self, request: pb.RecordConversionBatchRequest
    ) -> pb.RecordConversionBatchResponse: ...
    async def reverse_conversion(self, request: pb.ReverseConversionRequest) -> pb.Conversion: ...
    async def review_conversion(self, request: pb.ReviewConversionRequest) -> pb.Conversion: ...
    async def get_conversion(self, request: pb.GetConversionRequest) -> pb.Conversion: ...
    async def list_conversions(self, request: pb.ListConversionsRequest) -> pb.ListConversionsResponse: ...


class TrackingServicer(attribution_pb2_grpc.TrackingServiceServicer):
    def __init__(self, clicks: ClickSide, conversions: ConversionSide) -> None:
        self._clicks = clicks
        self._conversions = conversions

    async def RecordClick(self, request: pb.RecordClickRequest, context: Context) -> pb.RecordClickResponse:
        return await self._clicks.record_click(request)

    async def RecordClickBatch(
        self, request: pb.RecordClickBatchRequest, context: Context
    ) -> pb.RecordClickBatchResponse:
        return await self._clicks.record_click_batch(request)

    async def RecordClickStream(
        self, requests: AsyncIterator[pb.RecordClickStreamRequest], context: Context
    ) -> AsyncIterator[pb.RecordClickStreamResponse]:
        async for response in self._clicks.record_click_stream(requests):
            yield response

    async def GetClick(self, request: pb.GetClickRequest, context: Context) -> pb.Click:
        return await self._clicks.get_click(request)

    async def RecordConversion(self, request: pb.RecordConversionRequest, context: Context) -> pb.Conversion:
        return await self._conversions.record_conversion(request)

    async def RecordConversionBatch(
        self, request: pb.RecordConversionBatchRequest, context: Context
    ) -> pb.RecordConversionBatchResponse:
        return await self._conversions.record_conversion_batch(request)

    async def ReverseConversion(self, request: pb.ReverseConversionRequest, context: Context) -> pb.Conversion:
        return await self._conversions.reverse_conversion(request)

    async def ReviewConversion(self, request: pb.ReviewConversionRequest, context: Context) -> pb.Conversion:
        return await self._conversions.review_conversion(request)

    async def GetConversion(self, request: pb.GetConversionRequest, context: Context) -> pb.Conversion:
        return await self._conversions.get_conversion(request)

    async def ListConversions(
        self, request: pb.ListConversionsRequest, context: Context
    ) -> pb.ListConversionsResponse:
        return await self._conversions.list_conversions(request)
