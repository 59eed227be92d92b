"""The customer address a validation falls back to is the real gRPC peer, IPv6 included."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attribution.checkout.validator import peer_ip


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(("bind", "target", "expected"), [
    ("127.0.0.1:0", "127.0.0.1:{port}", "127.0.0.1"),
    ("[::1]:0", "[::1]:{port}", "::1"),
])
async def test_the_peer_of_a_real_call_is_an_address(bind: str, target: str, expected: str) -> None:
    """Without it a shop calling from IPv6 without ``ip`` had no address: its guesses were never counted."""
    if ":" in expected and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    seen: list[str] = []

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(
            self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
        ) -> health_pb2.HealthCheckResponse:
            seen.append(peer_ip(context.peer()))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_insecure_port(bind)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(target.format(port=port)) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(None)
    assert seen == [expected]
