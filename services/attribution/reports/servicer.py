"""ReportService: what every code, affiliate, channel and country earns.

Reports land with the reporting work; until then the contract says UNIMPLEMENTED
(the interceptor turns NotImplementedError into that status).
"""

from __future__ import annotations

from typing import Any

import grpc
from ascribe.attribution.v1 import attribution_pb2, attribution_pb2_grpc


class ReportServicer(attribution_pb2_grpc.ReportServiceServicer):
    async def GetReport(
        self, request: attribution_pb2.GetReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> attribution_pb2.GetReportResponse:
        raise NotImplementedError("GetReport")
