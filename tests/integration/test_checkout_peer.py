"""The customer address a validation falls back to is the real gRPC peer, IPv6 included."""

from __future__ import annotations

import socket
from typing import Any, cast

import grpc
import pytest

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

    async def peer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return peer_ip(context.peer()).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Peer", {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
    ),))
    port = server.add_insecure_port(bind)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(target.format(port=port)) as channel:
            call = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary("/t.Peer/Peer"))
            answer = await call(b"", timeout=5)
    finally:
        await server.stop(None)
    assert answer == expected.encode()
