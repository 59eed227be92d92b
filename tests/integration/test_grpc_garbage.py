"""Garbage in, clean errors out: raw bytes to every gRPC method of both services.

A message that does not decode is INVALID_ARGUMENT ``malformed request
message`` on unary and streaming methods alike; a guarded method checks its
token before it decodes anything; the log gets a count per interval, never a
traceback per call; and both services go on serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2
from ascribe.fraud.v1 import fraud_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.attribution.server import AttributionService, start_attribution
from services.attribution.server import required_tokens as attribution_tokens
from services.common.grpc_server import (
    MALFORMED_LOG_INTERVAL_SECONDS,
    MALFORMED_MESSAGE,
    ServerInterceptor,
    bearer_metadata,
)
from services.fraud.ipintel import IpIntelHolder
from services.fraud.server import FraudService, start_fraud
from services.fraud.server import required_tokens as fraud_tokens
from tests.support import attribution_settings, fraud_settings

ADMIN = "admin-t0ken"
INTERNAL = "internal-t0ken"
# An invalid wire type, and a length that runs past the end: no message decodes either.
GARBAGE = (b"\x0f", b"\x0a\x05ab")
OPEN_SERVICES = (health_pb2.DESCRIPTOR.services_by_name["Health"],
                 reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])

def raw_unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary call of ``path`` sending and answering bytes as they are (identity serializers)."""
    return cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path))


def raw_unary_stream(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return cast("grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(path))


def raw_stream_unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
    return cast("grpc.aio.StreamUnaryMultiCallable[bytes, bytes]", channel.stream_unary(path))


def raw_stream_stream(channel: grpc.aio.Channel, path: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
    return cast("grpc.aio.StreamStreamMultiCallable[bytes, bytes]", channel.stream_stream(path))



@dataclass
class Target:
    port: int
    services: tuple[ServiceDescriptor, ...]
    tokens: dict[str, str | None]


@pytest.fixture
async def targets(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, shared_intel: IpIntelHolder
) -> AsyncIterator[list[Target]]:
    fraud: FraudService = await start_fraud(
        replace(fraud_settings(redis_server_url, redis_prefix, ipintel_dir), internal_token=INTERNAL),
        handle_sighup=False, intel=shared_intel,
    )
    settings = attribution_settings(
        database_url, f"127.0.0.1:{fraud.port}", admin_token=ADMIN, internal_token=INTERNAL
    )
    attribution: AttributionService = await start_attribution(settings)
    try:
        yield [
            Target(attribution.port, tuple(attribution_pb2.DESCRIPTOR.services_by_name.values()),
                   attribution_tokens(settings)),
            Target(fraud.port, tuple(fraud_pb2.DESCRIPTOR.services_by_name.values()),
                   fraud_tokens(fraud.settings)),
        ]
    finally:
        await attribution.stop(0.5)
        await fraud.stop(0.5)


def _methods(target: Target) -> Iterator[tuple[str, MethodDescriptor]]:
    for service in (*target.services, *OPEN_SERVICES):
        for method in service.methods:
            yield f"/{service.full_name}/{method.name}", method


async def _send_raw(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, payload: bytes, metadata: Any
) -> grpc.aio.AioRpcError | None:
    """Sends ``payload`` as the request message(s), with identity serializers; the call's error, if any."""

    async def one() -> AsyncIterator[bytes]:
        yield payload

    try:
        if method.client_streaming and method.server_streaming:
            async for _ in raw_stream_stream(channel, path)(one(), timeout=10, metadata=metadata):
                pass
        elif method.client_streaming:
            await raw_stream_unary(channel, path)(one(), timeout=10, metadata=metadata)
        elif method.server_streaming:
            async for _ in raw_unary_stream(channel, path)(payload, timeout=10, metadata=metadata):
                pass
        else:
            await raw_unary(channel, path)(payload, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def test_raw_bytes_to_every_method(targets: list[Target], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    answers: dict[tuple[str, str, bytes], tuple[grpc.StatusCode | None, str | None]] = {}
    kinds = set()
    for target in targets:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{target.port}") as channel:
            for path, method in _methods(target):
                kinds.add((method.client_streaming, method.server_streaming))
                needed = target.tokens.get(path)
                for payload in GARBAGE:
                    for label, token in (("with", needed), ("without", None)):
                        error = await _send_raw(channel, path, method, payload, bearer_metadata(token))
                        answers[(path, label, payload)] = (
                            (error.code(), error.details()) if error else (None, None)
                        )
                        # The token is checked first: garbage without it is refused as such.
                        if label == "without" and needed:
                            assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, path
                        else:
                            assert error is not None, path
                            assert (error.code(), error.details()) == (
                                grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE
                            ), (path, label)
            # Still serving, on the same channel.
            health = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            answer = await health(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # Unary, server-streaming and bidirectional methods were all tried.
    assert {(False, False), (False, True), (True, True)} <= kinds
    assert len(answers) > 100
    elapsed = time.monotonic() - started
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r for r in caplog.records if "DecodeError" in r.getMessage() or "Unexpected" in r.getMessage()]
    reports = [r for r in caplog.records if "malformed request message" in r.getMessage()]
    # One line per interval per server (two servers), never one per call.
    assert 2 <= len(reports) <= 2 * (math.ceil(elapsed / MALFORMED_LOG_INTERVAL_SECONDS) + 1)


async def _check(request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_malformed_messages_are_counted_between_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = grpc.aio.server(interceptors=[ServerInterceptor({}, malformed_log_interval_seconds=0.3)])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("t.T", {
            "Check": grpc.unary_unary_rpc_method_handler(
                _check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            ),
        }),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = raw_unary(channel, "/t.T/Check")
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError):
                    await check(b"\x0f", timeout=5)
            await asyncio.sleep(0.35)
            with pytest.raises(grpc.aio.AioRpcError):
                await check(b"\x0f", timeout=5)
            # A message that decodes still goes through.
            assert await check(b"", timeout=5) == health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING
            ).SerializeToString()
    finally:
        await server.stop(0)
    reports = [r.getMessage() for r in caplog.records if "malformed request message" in r.getMessage()]
    assert len(reports) == 2
    assert reports[0].startswith("1 malformed")
    assert reports[1].startswith("5 malformed")  # the four held back, and the one that logged
