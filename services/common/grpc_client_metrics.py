"""Prometheus metrics for every outgoing gRPC call: a client interceptor per call type.

``grpc_client_started_total``, ``grpc_client_handled_total{grpc_code}`` and
``grpc_client_handling_seconds`` (services.common.metrics, registered once)
with go-grpc-prometheus's labels. ``open_channel`` installs them on every
channel between our services, so the gateway's calls to attribution and
attribution's calls to fraud show on those services' metrics ports.

A unary answer is awaited in the interceptor (the caller awaits it anyway);
a call that streams requests or answers is observed from its done callback,
so a caller writing to the stream is never held up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

import grpc
from grpc.aio import (
    ClientCallDetails,
    StreamStreamClientInterceptor,
    StreamUnaryClientInterceptor,
    UnaryStreamClientInterceptor,
    UnaryUnaryClientInterceptor,
)
from prometheus_client import Counter, Histogram

from services.common.metrics import (
    GRPC_CLIENT_HANDLED_TOTAL,
    GRPC_CLIENT_HANDLING_SECONDS,
    GRPC_CLIENT_STARTED_TOTAL,
)

# The tasks that read a finished stream's status; kept so none is collected early.
_PENDING: set[asyncio.Task[None]] = set()


class _Method:
    """One method's label children, resolved once (labels() costs a lock and a dict lookup)."""

    __slots__ = ("handled", "labels", "seconds", "started")

    def __init__(self, grpc_type: str, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.labels = (grpc_type, service or "unknown", method or full_method)
        self.started: Counter = GRPC_CLIENT_STARTED_TOTAL.labels(*self.labels)
        self.seconds: Histogram = GRPC_CLIENT_HANDLING_SECONDS.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Counter] = {}

    def done(self, code: grpc.StatusCode, started_at: float) -> None:
        self.seconds.observe(time.perf_counter() - started_at)
        counter = self.handled.get(code)
        if counter is None:
            counter = self.handled[code] = GRPC_CLIENT_HANDLED_TOTAL.labels(*self.labels, code.name)
        counter.inc()


class _Metered:
    """What the four interceptors share: the method's labels, the start, the observation."""

    def __init__(self, grpc_type: str) -> None:
        self._type = grpc_type
        self._methods: dict[str | bytes, _Method] = {}

    def _start(self, details: ClientCallDetails) -> tuple[_Method, float]:
        name = details.method
        method = self._methods.get(name)
        if method is None:
            text = name.decode() if isinstance(name, bytes) else name
            method = self._methods[name] = _Method(self._type, text)
        method.started.inc()
        return method, time.perf_counter()

    async def _streaming(
        self, continuation: Callable[[ClientCallDetails, Any], Any], details: ClientCallDetails, request: Any
    ) -> Any:
        """A call that streams requests, answers or both: observed from its done callback."""
        method, started_at = self._start(details)
        call = await continuation(details, request)

        def done(finished: Any) -> None:
            async def record() -> None:
                method.done(await finished.code(), started_at)

            task = asyncio.get_running_loop().create_task(record())
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

        call.add_done_callback(done)
        return call


class _UnaryUnary(_Metered, UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[[ClientCallDetails, Any], Any], details: ClientCallDetails, request: Any
    ) -> Any:
        method, started_at = self._start(details)
        try:
            call = await continuation(details, request)
            code = await call.code()
        except asyncio.CancelledError:
            method.done(grpc.StatusCode.CANCELLED, started_at)
            raise
        method.done(code, started_at)
        return call


class _UnaryStream(_Metered, UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[[ClientCallDetails, Any], Any], details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._streaming(continuation, details, request)


class _StreamUnary(_Metered, StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[[ClientCallDetails, Any], Any],
        details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await self._streaming(continuation, details, request_iterator)


class _StreamStream(_Metered, StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[[ClientCallDetails, Any], Any],
        details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await self._streaming(continuation, details, request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The interceptors for one channel (they share the process's metrics)."""
    return [_UnaryUnary("unary"), _UnaryStream("server_stream"), _StreamUnary("client_stream"),
            _StreamStream("bidi_stream")]
