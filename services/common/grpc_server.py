"""The shared shape of our gRPC servers.

One interceptor does four things for every RPC: checks the bearer token the
method needs (and, under mutual TLS, the client certificate's identity),
decodes the request message only then (one that does not decode is
INVALID_ARGUMENT), turns domain exceptions into status codes (never UNKNOWN;
an unexpected error becomes INTERNAL with a generic message and its
traceback goes to the log), and records request counts and latency.
``start_server`` adds health checking, reflection, the keepalive policy and
TLS (services/common/channels.py), and a plaintext health-only port for
probes when asked.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
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

from services.common import deadlines
from services.common.channels import Transport, server_options
from services.common.errors import DomainError, InvalidArgument, ResourceExhausted
from services.common.metrics import (
    GRPC_SERVER_HANDLED_TOTAL,
    GRPC_SERVER_HANDLING_SECONDS,
    GRPC_SERVER_STARTED_TOTAL,
    grpc_type,
)
from services.common.status_details import token_refused_status
from services.common.tls import ServerCertificates

logger = logging.getLogger(__name__)

AUTHORIZATION_HEADER = "authorization"


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


# Public for servicers that accept a token besides the interceptor's (AssignVariant).
presented_token = _presented_token


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
    if isinstance(error, ResourceExhausted) and error.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.seconds = error.retry_after_seconds
        packed = any_pb2.Any()
        packed.Pack(retry)
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
_Decode: TypeAlias = "Callable[[bytes], Any] | None"

MALFORMED_MESSAGE = "malformed request message"
# At most one log line per this many seconds about malformed messages, with
# their count: anyone who can reach the port could otherwise flood the log.
MALFORMED_LOG_INTERVAL_SECONDS = 10.0


class MalformedMessage(DomainError):
    """A request message that does not decode; the text says nothing of why (no library internals)."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self) -> None:
        super().__init__(MALFORMED_MESSAGE)


class _MalformedLog:
    """Counts malformed messages and logs them once per interval, never with a traceback."""

    def __init__(self, interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._count = 0
        self._last = -float("inf")

    def note(self, service: str, method: str) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            logger.warning(
                "%d malformed request message(s) since the last report (latest: %s/%s); "
                "answered INVALID_ARGUMENT",
                self._count, service, method,
            )
            self._count = 0
            self._last = now


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Auth, message decoding, error mapping and metrics for every RPC of a server.

    ``required_tokens`` maps a full method name (``/pkg.Service/Method``) to
    the token it needs; a method absent from it, or mapped to None, is open.
    ``peer_identities`` maps a full method name to the client certificate
    identities (SAN names, else the CN) allowed to call it under mutual TLS.

    Every handler is rewrapped to receive raw bytes and decode them itself,
    after the token check: an unauthenticated caller gets UNAUTHENTICATED
    whatever it sent, and a message that does not decode is
    INVALID_ARGUMENT ``malformed request message`` on every kind of method,
    rather than grpc's UNKNOWN (unary) or INTERNAL (streams) with the
    exception's class and a traceback in the log per call.
    """

    def __init__(
        self,
        required_tokens: Mapping[str, str | None],
        unavailable_errors: tuple[type[BaseException], ...] = (),
        *,
        peer_identities: Mapping[str, frozenset[str]] | None = None,
        malformed_log_interval_seconds: float = MALFORMED_LOG_INTERVAL_SECONDS,
        gate: Callable[[str], str | None] | None = None,
    ) -> None:
        self._required_tokens = dict(required_tokens)
        self._peer_identities = dict(peer_identities or {})
        # Errors that mean a dependency is down or too slow (a database that
        # refuses connections, a query past its timeout): UNAVAILABLE, so the
        # caller retries, rather than INTERNAL.
        self._unavailable_errors = unavailable_errors
        self._malformed = _MalformedLog(malformed_log_interval_seconds)
        self._token_refused = token_refused_status()
        # The wrapped handler of each (method, authorized) pair, made once:
        # building handler tuples, closures and metric children on every call
        # costs tens of microseconds per RPC.
        self._wrapped: dict[tuple[str, bool], tuple[_Handler, _Handler]] = {}
        # Given a full method name, a reason to refuse it as UNAVAILABLE for
        # now, or None (the attribution service's deferred migrations).
        self._gate = gate

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
        if self._gate is not None and authorized:
            refusal = self._gate(full_method)
            if refusal is not None:
                return _refusing(handler, grpc.StatusCode.UNAVAILABLE, refusal)
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
        labels = (grpc_type(handler), service, method)
        decode: _Decode = handler.request_deserializer
        serialize = handler.response_serializer
        allowed = self._peer_identities.get(full_method)
        # request_deserializer None: grpc hands the wrapper the raw bytes.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, labels, authorized, allowed, self._one(decode)),
                response_serializer=serialize,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, labels, authorized, allowed, self._each(decode)),
                response_serializer=serialize,
            )
        behavior = handler.unary_stream or handler.stream_stream
        prepare = self._one(decode) if handler.unary_stream is not None else self._each(decode)
        wrapped = self._wrap_stream(behavior, labels, authorized, allowed, prepare)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrapped, response_serializer=serialize)
        return grpc.stream_stream_rpc_method_handler(wrapped, response_serializer=serialize)

    def _one(self, decode: _Decode) -> Callable[[Any, str, str], Any]:
        """A single request message, decoded (raising MalformedMessage)."""

        def prepare(raw: Any, service: str, method: str) -> Any:
            if decode is None:
                return raw
            try:
                return decode(raw)
            except Exception:  # DecodeError, bad UTF-8, anything the library raises
                self._malformed.note(service, method)
                raise MalformedMessage() from None

        return prepare

    def _each(self, decode: _Decode) -> Callable[[Any, str, str], Any]:
        """A request stream whose messages are decoded as the behaviour reads them."""
        one = self._one(decode)

        def prepare(raw_requests: Any, service: str, method: str) -> Any:
            if decode is None:
                return raw_requests

            async def decoded() -> AsyncIterator[Any]:
                async for raw in raw_requests:
                    yield one(raw, service, method)

            return decoded()

        return prepare

    async def _check_caller(
        self, context: grpc.aio.ServicerContext[Any, Any], authorized: bool, allowed: frozenset[str] | None
    ) -> None:
        """Aborts an RPC whose caller may not make it; before its message is decoded."""
        if not authorized:
            await context.abort_with_status(self._token_refused)
        if allowed is not None and not _peer_allowed(context, allowed):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "this client certificate may not call this method"
            )

    def _wrap_unary(
        self,
        behavior: Any,
        labels: tuple[str, str, str],
        authorized: bool,
        allowed: frozenset[str] | None,
        prepare: Callable[[Any, str, str], Any],
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        _, service, method = labels
        handling_seconds = GRPC_SERVER_HANDLING_SECONDS.labels(*labels)
        started_total = GRPC_SERVER_STARTED_TOTAL.labels(*labels)
        count = self._counter(labels)
        check = self._check_caller

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            started_total.inc()
            code = grpc.StatusCode.OK
            token = None
            try:
                if not authorized or allowed is not None:
                    await check(context, authorized, allowed)
                # The caller's deadline bounds every call made for it; a call
                # whose caller has already gone is not started.
                token = deadlines.enter(context.time_remaining())
                return await behavior(prepare(request, service, method), context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, answer = self._failure(error, context, service, method, code)
                if answer is None:
                    raise
                await _abort(context, code, answer)
            finally:
                if token is not None:
                    deadlines.leave(token)
                handling_seconds.observe(time.perf_counter() - started)
                count(code)

        return wrapper

    def _wrap_stream(
        self,
        behavior: Any,
        labels: tuple[str, str, str],
        authorized: bool,
        allowed: frozenset[str] | None,
        prepare: Callable[[Any, str, str], Any],
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        # No handling-time histogram here: a stream (WatchAlerts, the batch
        # streams) lives for minutes or hours and would only blur the unary
        # latencies. ``request`` is a stream method's request iterator.
        _, service, method = labels
        started_total = GRPC_SERVER_STARTED_TOTAL.labels(*labels)
        count = self._counter(labels)
        check = self._check_caller

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started_total.inc()
            code = grpc.StatusCode.OK
            try:
                if not authorized or allowed is not None:
                    await check(context, authorized, allowed)
                responses = behavior(prepare(request, service, method), context)
                if inspect.isawaitable(responses):
                    # A servicer that answers with context.write() and returns
                    # nothing (grpc's own Health/Watch): there is nothing to iterate.
                    await responses
                else:
                    async for item in responses:
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
    def _counter(labels: tuple[str, str, str]) -> Callable[[grpc.StatusCode], None]:
        """Counts an RPC's outcome; the OK child is bound once, the rare codes looked up.

        ``grpc_code`` is the StatusCode's name (``OK``, ``UNAVAILABLE``), as
        py-grpc-prometheus writes it.
        """
        ok_total = GRPC_SERVER_HANDLED_TOTAL.labels(*labels, grpc.StatusCode.OK.name)

        def count(code: grpc.StatusCode) -> None:
            if code is grpc.StatusCode.OK:
                ok_total.inc()
            else:
                GRPC_SERVER_HANDLED_TOTAL.labels(*labels, code.name).inc()

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
        if isinstance(error, grpc.aio.AbortError):  # context.abort() already chose the status
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


def _peer_allowed(context: grpc.aio.ServicerContext[Any, Any], allowed: frozenset[str]) -> bool:
    """True when the client certificate names one of ``allowed`` (SAN names, else its CN)."""
    identities = context.peer_identities() or ()
    return any(identity.decode(errors="replace") in allowed for identity in identities)


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s kind that ends the call with ``code`` at once, reading nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, answer: grpc.Status | str
) -> None:
    if isinstance(answer, str):
        await context.abort(code, answer)
    else:
        await context.abort_with_status(answer)


Registrar = Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer and bound port."""

    name: str
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    # The plaintext server answering only grpc.health.v1.Health, when asked for.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def stop(self, grace_seconds: float = 4.0) -> None:
        """Health NOT_SERVING first, so balancers stop sending, then drain."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        logger.info("%s stopped", self.name)


async def start_server(
    *,
    name: str,
    addr: str,
    service_names: Iterable[str],
    register: Registrar,
    interceptor: ServerInterceptor,
    transport: Transport | None = None,
    health_addr: str | None = None,
) -> RunningServer:
    """Builds and starts a server with health checking and reflection.

    ``health_addr``: also serve grpc.health.v1.Health alone, in plaintext,
    there. Kubernetes' gRPC probe speaks no TLS, and a TLS port cannot also
    answer plaintext, so under TLS probes use this port; it exposes nothing
    but the serving status, which is what probes (and anyone) may see.
    """
    transport = transport or Transport()
    options = server_options(transport.keepalive)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if transport.tls.enabled:
        port = server.add_secure_port(addr, ServerCertificates(transport.tls).credentials())
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"{name}: cannot bind {addr}")
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    if health_addr:
        health_server = grpc.aio.server(interceptors=[interceptor], options=options)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(health_addr)
        if health_port == 0:
            raise OSError(f"{name}: cannot bind {health_addr}")
    await server.start()
    if health_server is not None and health_addr:
        await health_server.start()
        logger.info("%s health (plaintext) on %s:%d", name, health_addr.rsplit(":", 1)[0], health_port)
    for service_name in ["", *names]:
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "%s serving on %s:%d%s", name, addr.rsplit(":", 1)[0], port,
        " (TLS, client certificates required)" if transport.tls.client_auth
        else " (TLS)" if transport.tls.enabled else "",
    )
    return RunningServer(
        name=name, server=server, health=health_servicer, port=port,
        health_server=health_server, health_port=health_port,
    )


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
