"""The shared interceptor on a real gRPC server: a client-streaming method it does not wrap is still guarded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.grpc_server import ServerInterceptor, bearer_metadata

TOKEN = "t0ken"


async def _count(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"%d" % len([r async for r in requests])


@pytest.fixture
async def server_port() -> AsyncIterator[int]:
    server = grpc.aio.server(interceptors=[ServerInterceptor({"/t.T/Upload": TOKEN})])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("t.T", {"Upload": grpc.stream_unary_rpc_method_handler(_count)}),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


async def test_a_client_streaming_method_needs_its_token(server_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        upload: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary("/t.T/Upload")

        async def three() -> AsyncIterator[bytes]:
            for chunk in (b"a", b"b", b"c"):
                yield chunk

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(three(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await upload(three(), timeout=5, metadata=bearer_metadata("wrong"))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await upload(three(), timeout=5, metadata=bearer_metadata(TOKEN)) == b"3"
