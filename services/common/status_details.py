"""Error details our services attach to statuses, and how callers read them.

A caller decides what a status means by its code and these details, never by
its message text (which is for people and may change).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "ascribe"
# UNAUTHENTICATED because the bearer token a service needs (ASCRIBE_ADMIN_TOKEN,
# ASCRIBE_INTERNAL_TOKEN) is missing or wrong: the calling process is
# misconfigured. A shop's wrong postback token is UNAUTHENTICATED without it.
TOKEN_REFUSED = "BEARER_TOKEN_REFUSED"
TOKEN_REFUSED_MESSAGE = "missing or wrong bearer token"


def token_refused_status() -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=TOKEN_REFUSED, domain=ERROR_DOMAIN))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=grpc.StatusCode.UNAUTHENTICATED.value[0], message=TOKEN_REFUSED_MESSAGE, details=[info]
        )
    )
    return status


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ``ErrorInfo`` reason our services attached to a failed call, if any."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that do not match the call's code and message
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return str(info.reason)
    return None
