"""Keepalive between our channels and servers: an idle connection is never dropped for pinging.

Every hop (gateway -> attribution, gateway -> fraud, attribution -> fraud) is a
channel from ``services.common.channels.open_channel`` to a server from
``services.common.grpc_server.start_server``; these tests use exactly those,
with the intervals shrunk by settings so that several pings pass in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from services.common.channels import Keepalive, Transport, channel_options, open_channel
from services.common.env import ConfigError
from services.common.grpc_server import ServerInterceptor, start_server

# gRPC pings at most once a second, whatever keepalive_ms asks.
FAST = Transport(keepalive=Keepalive(keepalive_ms=1000, keepalive_timeout_ms=2000, min_ping_interval_ms=500))
IDLE_SECONDS = 8.0  # seven pings or more; gRPC's default policy drops the connection after about five

def raw_unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary call of ``path`` sending and answering bytes as they are (identity serializers)."""
    return cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path))


def raw_unary_stream(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return cast("grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(path))



class Peers:
    """A unary method answering the caller's address, and a stream that waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def peer(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return context.peer().encode()

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        await self.release.wait()
        yield b"released"

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("t.Peers", {
                "Peer": grpc.unary_unary_rpc_method_handler(self.peer),
                "Wait": grpc.unary_stream_rpc_method_handler(self.wait),
            }),
        ))


async def _hold_idle(channel: grpc.aio.Channel, peers: Peers, seconds: float) -> tuple[Any, list[Any]]:
    """Opens a stream, leaves the connection idle, and returns the stream's end and the channel's states."""
    first_peer = await raw_unary(channel, "/t.Peers/Peer")(b"", timeout=5)
    stream = raw_unary_stream(channel, "/t.Peers/Wait")(b"", timeout=seconds + 10)

    async def read() -> Any:
        try:
            return [item async for item in stream]
        except grpc.aio.AioRpcError as error:
            return error

    reader = asyncio.create_task(read())
    states = [channel.get_state()]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not reader.done():
        state = channel.get_state()
        if state != states[-1]:
            states.append(state)
        await asyncio.sleep(0.05)
    if reader.done():
        return reader.result(), states
    peers.release.set()
    answer = await asyncio.wait_for(reader, 5)
    last_peer = await raw_unary(channel, "/t.Peers/Peer")(b"", timeout=5)
    # The same client address: the calls before and after the idle spell
    # travelled on one connection, so no GOAWAY made the channel reconnect.
    assert last_peer == first_peer
    return answer, states


async def test_an_idle_stream_outlives_several_pings() -> None:
    peers = Peers()
    running = await start_server(
        name="t", addr="127.0.0.1:0", service_names=[], register=peers.register,
        interceptor=ServerInterceptor({}), transport=FAST,
    )
    try:
        async with open_channel(f"127.0.0.1:{running.port}", FAST) as channel:
            answer, states = await _hold_idle(channel, peers, IDLE_SECONDS)
    finally:
        await running.stop(0)
    assert answer == [b"released"]
    assert states == [grpc.ChannelConnectivity.READY]


async def test_grpc_default_server_policy_drops_the_same_idle_stream() -> None:
    """Why the server needs our policy: with gRPC's defaults our clients' pings end in GOAWAY.

    This also shows the test above can fail: the client really pings at
    that rate, and a dropped connection shows as a failed stream.
    """
    peers = Peers()
    server = grpc.aio.server()
    peers.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", FAST) as channel:
            answer, _ = await _hold_idle(channel, peers, 10)
    finally:
        await server.stop(0)
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (answer.details() or "").lower()


def test_the_server_minimum_may_not_exceed_the_client_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_GRPC_KEEPALIVE_MS", "20000")
    monkeypatch.setenv("ASCRIBE_GRPC_MIN_PING_INTERVAL_MS", "30000")
    with pytest.raises(ConfigError, match="ASCRIBE_GRPC_MIN_PING_INTERVAL_MS"):
        Keepalive.from_env()
    monkeypatch.setenv("ASCRIBE_GRPC_MIN_PING_INTERVAL_MS", "20000")
    assert Keepalive.from_env() == Keepalive(20000, 10000, 20000)
    monkeypatch.setenv("ASCRIBE_GRPC_KEEPALIVE_MS", "500")
    with pytest.raises(ConfigError, match="ASCRIBE_GRPC_KEEPALIVE_MS"):
        Keepalive.from_env()


def test_channels_keep_pinging_an_idle_connection() -> None:
    options = dict(channel_options(Keepalive()))
    assert options["grpc.keepalive_time_ms"] == 30_000
    # Without this gRPC sends two pings without data, then one a minute.
    assert options["grpc.http2.max_pings_without_data"] == 0
