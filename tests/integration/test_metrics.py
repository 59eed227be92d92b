"""Metrics of the shared interceptor and the PostgreSQL pool, read back from the registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from services.attribution.metrics import POOLS
from services.common.errors import NotFound
from services.common.grpc_server import ServerInterceptor

SERVICE = "t.Metrics"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _echo(request: bytes, context: Any) -> bytes:
    if request == b"missing":
        raise NotFound("no such thing")
    return request


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([r async for r in requests])


async def _watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ServerInterceptor({})])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Upload": grpc.stream_unary_rpc_method_handler(_upload),
            "Watch": grpc.unary_stream_rpc_method_handler(_watch),
        }),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(0)


async def test_rpcs_are_counted_with_the_conventional_labels(channel: grpc.aio.Channel) -> None:
    echo = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Echo"}
    upload = {"grpc_type": "client_stream", "grpc_service": SERVICE, "grpc_method": "Upload"}
    watch = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "Watch"}
    before = {
        "started echo": sample("grpc_server_started_total", **echo),
        "ok echo": sample("grpc_server_handled_total", **echo, grpc_code="OK"),
        "not found echo": sample("grpc_server_handled_total", **echo, grpc_code="NOT_FOUND"),
        "timed echo": sample("grpc_server_handling_seconds_count", **echo),
        "ok upload": sample("grpc_server_handled_total", **upload, grpc_code="OK"),
        "timed upload": sample("grpc_server_handling_seconds_count", **upload),
        "started watch": sample("grpc_server_started_total", **watch),
        "ok watch": sample("grpc_server_handled_total", **watch, grpc_code="OK"),
    }

    call_echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Echo")
    call_upload: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"/{SERVICE}/Upload")
    call_watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SERVICE}/Watch")
    assert await call_echo(b"hi", timeout=5) == b"hi"
    assert await call_echo(b"hi", timeout=5) == b"hi"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await call_echo(b"missing", timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"a", b"b"):
            yield part

    assert await call_upload(parts(), timeout=5) == b"ab"
    assert [message async for message in call_watch(b"x", timeout=5)] == [b"x"] * 3

    after = {
        "started echo": sample("grpc_server_started_total", **echo),
        "ok echo": sample("grpc_server_handled_total", **echo, grpc_code="OK"),
        "not found echo": sample("grpc_server_handled_total", **echo, grpc_code="NOT_FOUND"),
        "timed echo": sample("grpc_server_handling_seconds_count", **echo),
        "ok upload": sample("grpc_server_handled_total", **upload, grpc_code="OK"),
        "timed upload": sample("grpc_server_handling_seconds_count", **upload),
        "started watch": sample("grpc_server_started_total", **watch),
        "ok watch": sample("grpc_server_handled_total", **watch, grpc_code="OK"),
    }
    assert {key: after[key] - before[key] for key in before} == {
        "started echo": 3, "ok echo": 2, "not found echo": 1, "timed echo": 3,
        "ok upload": 1, "timed upload": 1,
        # Streams are counted, not timed: a stream's life would blur the latencies.
        "started watch": 1, "ok watch": 1,
    }
    assert sample("grpc_server_handling_seconds_count", **watch) == 0
    page = generate_latest(REGISTRY)
    assert b"_created" not in page
    assert b"ascribe_grpc_server_requests_total" not in page  # the old name is gone, not doubled


async def test_pool_gauges_show_use_and_waiters(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    POOLS.watch(pool)
    try:
        assert sample("ascribe_db_pool_max_connections") >= 2
        baseline_in_use = sample("ascribe_db_pool_connections_in_use")
        baseline_waiting = sample("ascribe_db_pool_waiting_acquires")
        first, second = await pool.acquire(), await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert sample("ascribe_db_pool_connections_in_use") - baseline_in_use == 2
        assert sample("ascribe_db_pool_waiting_acquires") - baseline_waiting == 1
        await pool.release(first)
        third = await asyncio.wait_for(waiter, 5)
        assert sample("ascribe_db_pool_waiting_acquires") - baseline_waiting == 0
        await pool.release(second)
        await pool.release(third)
        assert sample("ascribe_db_pool_connections_in_use") - baseline_in_use == 0
        max_open = sample("ascribe_db_pool_max_connections")
        await pool.close()
    finally:
        pool.terminate()  # after a failed assertion: close() would wait for the borrowed connections
    # A closed pool drops out of the sums.
    assert sample("ascribe_db_pool_max_connections") == max_open - 2
