"""The shared shape of our gRPC servers.

One interceptor does three things for every RPC: checks the bearer token the
method needs, turns domain exceptions into status codes (never UNKNOWN; an
unexpected error becomes INTERNAL with a generic message and its traceback
goes to the log), and records request counts and latency. ``run_server``
adds health checking and reflection, and stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from services.common.errors import DomainError, InvalidArgument
from services.common.metrics import GRPC_HANDLING_SECONDS, GRPC_REQUESTS_TOTAL

logger = logging.getLogger(__name__)

AUTHORIZATION_HEADER = "authorization"
# The gateway tells its own token being refused (a misconfiguration: 503)
# from a shop's bad postback token (401) by this message.
BEARER_REFUSED = "missing or wrong bearer token"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Outgoing metadata carrying ``token`` (nothing when no token is configured)."""
    return ((AUTHORIZATION_HEADER, f"Bearer {token}"),) if token else ()


def _presented_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_HEADER and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so timing does not leak the secret."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def status_for(error: DomainError) -> grpc.Status:
    """The rich status for a domain error (BadRequest details for field violations)."""
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    proto_status = status_pb2.Status(
        code=error.status.value[0], message=error.message, details=details
    )
    status: grpc.Status = rpc_status.to_status(proto_status)
    return status


def _split_method(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2) if full_method.count("/") == 2 else ("", "", full_method)
    return service, method


_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Auth, error mapping and metrics for every RPC of a server.

    ``required_tokens`` maps a full method name (``/pkg.Service/Method``) to
    the token it needs; a method absent from it, or mapped to None, is open.
    """

    def __init__(
        self,
        required_tokens: Mapping[str, str | None],
        unavailable_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._required_tokens = dict(required_tokens)
        # Errors that mean a dependency is down or too slow (a database that
        # refuses connections, a query past its timeout): UNAVAILABLE, so the
        # caller retries, rather than INTERNAL.
        self._unavailable_errors = unavailable_errors
        # The wrapped handler of each (method, authorized) pair, made once:
        # building handler tuples, closures and metric children on every call
        # costs tens of microseconds per RPC.
        self._wrapped: dict[tuple[str, bool], tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full_method = handler_call_details.method
        expected = self._required_tokens.get(full_method)
        authorized = expected is None or token_matches(
            _presented_token(handler_call_details.invocation_metadata), expected
        )
        cached = self._wrapped.get((full_method, authorized))
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full_method, authorized)
        self._wrapped[(full_method, authorized)] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], full_method: str, authorized: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, method = _split_method(full_method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and full_method in self._required_tokens:
            # Ours (RecordClickStream, CheckClickStream): checked and counted
            # like a server stream; the wrapper passes the request iterator on.
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, service, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if not authorized:
            # A client-streaming method we do not guard (reflection is open):
            # refused outright rather than passed through unchecked.
            return grpc.stream_unary_rpc_method_handler(
                _refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(
        self, behavior: Any, service: str, method: str, authorized: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        handling_seconds = GRPC_HANDLING_SECONDS.labels(service, method)
        count = self._counter(service, method)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not authorized:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(code, BEARER_REFUSED)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, answer = self._failure(error, context, service, method, code)
                if answer is None:
                    raise
                await _abort(context, code, answer)
            finally:
                handling_seconds.observe(time.perf_counter() - started)
                count(code)

        return wrapper

    def _wrap_stream(
        self, behavior: Any, service: str, method: str, authorized: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        # No handling-time histogram here: a stream (WatchAlerts, the batch
        # streams) lives for minutes or hours and would only blur the unary
        # latencies. ``request`` is a stream method's request iterator.
        count = self._counter(service, method)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            code = grpc.StatusCode.OK
            try:
                if not authorized:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(code, BEARER_REFUSED)
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, answer = self._failure(error, context, service, method, code)
                if answer is None:
                    raise
                await _abort(context, code, answer)
            finally:
                count(code)

        return wrapper

    @staticmethod
    def _counter(service: str, method: str) -> Callable[[grpc.StatusCode], None]:
        """Counts an RPC's outcome; the OK child is bound once, the rare codes looked up."""
        ok_total = GRPC_REQUESTS_TOTAL.labels(service, method, grpc.StatusCode.OK.name)

        def count(code: grpc.StatusCode) -> None:
            if code is grpc.StatusCode.OK:
                ok_total.inc()
            else:
                GRPC_REQUESTS_TOTAL.labels(service, method, code.name).inc()

        return count

    def _failure(
        self,
        error: Exception,
        context: grpc.aio.ServicerContext[Any, Any],
        service: str,
        method: str,
        code: grpc.StatusCode,
    ) -> tuple[grpc.StatusCode, grpc.Status | str | None]:
        """The status an RPC ends with for ``error``, and its answer (None: let it pass)."""
        if _is_abort(error):  # context.abort() already chose the status
            return context.code() or code, None
        if isinstance(error, DomainError):
            return error.status, status_for(error)
        if isinstance(error, NotImplementedError):
            return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet"
        if isinstance(error, self._unavailable_errors):
            logger.warning("%s/%s: a dependency is unavailable: %r", service, method, error)
            return grpc.StatusCode.UNAVAILABLE, "a backend is unavailable; retry"
        logger.error("unhandled error in %s/%s", service, method, exc_info=error)
        return grpc.StatusCode.INTERNAL, "internal error"


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, answer: grpc.Status | str
) -> None:
    if isinstance(answer, str):
        await context.abort(code, answer)
    else:
        await context.abort_with_status(answer)


async def _refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, BEARER_REFUSED)


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises an internal AbortError; it must pass through untouched.
    return type(error).__name__ == "AbortError"


Registrar = Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer and bound port."""

    name: str
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_seconds: float = 4.0) -> None:
        """Health NOT_SERVING first, so balancers stop sending, then drain."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)
        logger.info("%s stopped", self.name)


async def start_server(
    *,
    name: str,
    addr: str,
    service_names: Iterable[str],
    register: Registrar,
    interceptor: ServerInterceptor,
) -> RunningServer:
    """Builds and starts a server with health checking and reflection."""
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"{name}: cannot bind {addr}")
    await server.start()
    for service_name in ["", *names]:
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("%s serving on %s:%d", name, addr.rsplit(":", 1)[0], port)
    return RunningServer(name=name, server=server, health=health_servicer, port=port)


async def wait_for_stop_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
