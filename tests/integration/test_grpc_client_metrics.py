"""Outgoing gRPC calls are counted: grpc_client_* with go-grpc-prometheus's labels, read from a real /metrics.

A server of the test's own answers every call type (and fails one method);
the client is a channel from ``open_channel``, as every hop's; the counts are
read over HTTP from ``serve_metrics``, the listener every service runs.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.channels import Transport, open_channel
from services.common.grpc_server import RunningServer, ServerInterceptor, start_server
from services.common.metrics import serve_metrics
from tools.stack import free_port

SERVICE = "t.ClientMetrics"
Labels = tuple[tuple[str, str], ...]


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _missing(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns by raising")


async def _three(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _sum(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"".join([request async for request in requests])


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
        "Three": grpc.unary_stream_rpc_method_handler(_three),
        "Sum": grpc.stream_unary_rpc_method_handler(_sum),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    }),))


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await start_server(
        name="t", addr="127.0.0.1:0", service_names=[], register=_register, interceptor=ServerInterceptor({}),
    )
    yield running
    await running.stop(0)


@pytest.fixture(scope="module")
def metrics_url() -> str:
    port = free_port()
    serve_metrics("127.0.0.1", port)
    return f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> dict[tuple[str, Labels], float]:
    """Every sample of the page whose name starts with grpc_client_, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("grpc_client_")
    }


def key(name: str, grpc_type: str, method: str, **extra: str) -> tuple[str, Labels]:
    labels = {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, **extra}
    return name, tuple(sorted(labels.items()))


async def test_every_call_type_is_counted_with_its_code(server: RunningServer, metrics_url: str) -> None:
    before = await asyncio.to_thread(scrape, metrics_url)
    async with open_channel(f"127.0.0.1:{server.port}", Transport()) as channel:
        def path(method: str) -> str:
            return f"/{SERVICE}/{method}"

        echo = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path("Echo")))
        assert await echo(b"a", timeout=5) == b"a"
        assert await echo(b"b", timeout=5) == b"b"
        missing = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path("Missing")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await missing(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        three = cast("grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(path("Three")))
        assert [answer async for answer in three(b"x", timeout=5)] == [b"x"] * 3
        total = cast("grpc.aio.StreamUnaryMultiCallable[bytes, bytes]", channel.stream_unary(path("Sum")))
        assert await total(iter([b"1", b"2"]), timeout=5) == b"12"
        # The batch streams' way: write and read on the call object.
        bidi = cast("grpc.aio.StreamStreamMultiCallable[bytes, bytes]", channel.stream_stream(path("Bidi")))
        call = bidi(timeout=5)
        await call.write(b"p")
        assert await call.read() == b"p"
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    await asyncio.sleep(0.1)  # the streams' status is read by a task of its own
    after = await asyncio.to_thread(scrape, metrics_url)

    def added(name: str, grpc_type: str, method: str, **extra: str) -> float:
        which = key(name, grpc_type, method, **extra)
        return after.get(which, 0.0) - before.get(which, 0.0)

    assert added("grpc_client_started_total", "unary", "Echo") == 2
    assert added("grpc_client_handled_total", "unary", "Echo", grpc_code="OK") == 2
    assert added("grpc_client_handling_seconds_count", "unary", "Echo") == 2
    assert added("grpc_client_started_total", "unary", "Missing") == 1
    assert added("grpc_client_handled_total", "unary", "Missing", grpc_code="NOT_FOUND") == 1
    assert added("grpc_client_handled_total", "unary", "Missing", grpc_code="OK") == 0
    for grpc_type, method in (("server_stream", "Three"), ("client_stream", "Sum"), ("bidi_stream", "Bidi")):
        assert added("grpc_client_started_total", grpc_type, method) == 1, method
        assert added("grpc_client_handled_total", grpc_type, method, grpc_code="OK") == 1, method
        assert added("grpc_client_handling_seconds_count", grpc_type, method) == 1, method
    assert not any(name.endswith("_created") for name, _ in after)


async def test_a_deadline_and_a_down_server_are_counted(metrics_url: str) -> None:
    """What an outage looks like from the client: DEADLINE_EXCEEDED or UNAVAILABLE, counted like any code."""
    before = await asyncio.to_thread(scrape, metrics_url)
    async with open_channel(f"127.0.0.1:{free_port()}", Transport()) as channel:
        echo = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(f"/{SERVICE}/Echo"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await echo(b"", timeout=1)
    after = await asyncio.to_thread(scrape, metrics_url)
    code = failed.value.code().name
    assert code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    which = key("grpc_client_handled_total", "unary", "Echo", grpc_code=code)
    assert after.get(which, 0.0) - before.get(which, 0.0) == 1
