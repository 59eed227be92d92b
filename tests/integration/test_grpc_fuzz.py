"""Property-based fuzz: random bytes as the request of every gRPC method of both services.

Where tests/integration/test_grpc_garbage.py sends two fixed undecodable
messages, hypothesis here sends arbitrary bytes, with and without the
method's token. Whatever arrives: without a needed token the answer is
UNAUTHENTICATED; bytes that do not decode as the method's request are
INVALID_ARGUMENT ``malformed request message``; bytes that happen to decode
are an ordinary request, answered with a status of the contract — never
UNKNOWN, INTERNAL or DATA_LOSS — and no traceback reaches the log. Both
servers serve on the same channels throughout and after.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.grpc_server import MALFORMED_MESSAGE, bearer_metadata
from tests.integration.test_grpc_garbage import Target, _methods, _send_raw, targets

__all__ = ["targets"]  # the fixture, shared with the fixed-garbage test

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
# A request that decodes may legitimately wait for ever: the alert stream and
# health watches follow until the caller leaves (our deadline, not theirs).
ENDLESS = {"/ascribe.fraud.v1.FraudService/WatchAlerts", "/grpc.health.v1.Health/Watch"}
# Reflection answers whatever it is asked; its own library, not ours.
SKIPPED_PREFIX = "/grpc.reflection."


def _decodes(method: MethodDescriptor, payload: bytes) -> bool:
    try:
        GetMessageClass(method.input_type).FromString(payload)
    except DecodeError:
        return False
    return True


@pytest.fixture
async def channels(targets: list[Target]) -> AsyncIterator[list[tuple[Target, grpc.aio.Channel, list[Any]]]]:
    opened = []
    for target in targets:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{target.port}")
        methods = [(path, method) for path, method in _methods(target) if not path.startswith(SKIPPED_PREFIX)]
        opened.append((target, channel, methods))
    try:
        yield opened
    finally:
        for _, channel, _ in opened:
            await channel.close()


async def _serving(channel: grpc.aio.Channel) -> bool:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answer = await check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@settings(
    max_examples=250, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    which=st.integers(min_value=0, max_value=10_000),
    payload=st.one_of(st.binary(max_size=96), st.binary(min_size=1, max_size=8).map(lambda b: b * 16)),
    with_token=st.booleans(),
)
async def test_random_bytes_to_any_method_get_a_contract_status_and_the_server_keeps_serving(
    channels: list[tuple[Target, grpc.aio.Channel, list[Any]]],
    caplog: pytest.LogCaptureFixture,
    which: int,
    payload: bytes,
    with_token: bool,
) -> None:
    caplog.set_level(logging.WARNING)
    every = [(target, channel, path, method) for target, channel, methods in channels for path, method in methods]
    target, channel, path, method = every[which % len(every)]
    needed = target.tokens.get(path)
    token = needed if with_token else None
    timeout = 1.0 if path in ENDLESS else 10.0
    error = await _send_raw_with_timeout(channel, path, method, payload, bearer_metadata(token), timeout)
    code = error.code() if error is not None else grpc.StatusCode.OK
    assert code not in NEVER, (path, payload, code, error.details() if error else "")
    if needed and token is None:
        assert code == grpc.StatusCode.UNAUTHENTICATED, (path, code)
    elif not _decodes(method, payload):
        assert error is not None and (code, error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE
        ), (path, payload, code)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert path in ENDLESS, f"{path} did not answer a decodable request within {timeout} s"
    assert await _serving(channel)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def _send_raw_with_timeout(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, payload: bytes, metadata: Any, timeout: float
) -> grpc.aio.AioRpcError | None:
    if timeout >= 10:
        return await _send_raw(channel, path, method, payload, metadata)
    # The endless streams: _send_raw's deadline is 10 s; these get a short one.
    try:
        if method.server_streaming and not method.client_streaming:
            call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            async for _ in call(payload, timeout=timeout, metadata=metadata):
                pass
        else:
            return await _send_raw(channel, path, method, payload, metadata)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def test_health_watch_through_the_interceptor_streams_the_status(
    channels: list[tuple[Target, grpc.aio.Channel, list[Any]]],
) -> None:
    """Found by the fuzz: Watch (a servicer that writes, not yields) was INTERNAL with a traceback."""
    for _, channel, _ in channels:
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        call = watch(health_pb2.HealthCheckRequest(), timeout=5)
        first = await call.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
