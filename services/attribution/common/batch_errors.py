"""One entry's error in a batch answer (RecordClickBatch, RecordConversionBatch).

A bad entry fails only itself: its domain error travels in the entry as the
status code, message and field the interceptor would have sent for a single call.
"""

from __future__ import annotations

from ascribe.attribution.v1 import attribution_pb2 as pb

from services.common.errors import DomainError, InvalidArgument


def error_proto(error: DomainError) -> pb.Error:
    return pb.Error(
        code=error.status.value[0],
        message=error.message,
        field=error.field if isinstance(error, InvalidArgument) else "",
    )
