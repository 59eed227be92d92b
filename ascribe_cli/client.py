"""The attribution service as the CLI calls it: one channel, the admin token, a deadline on every call.

A refused or failed call becomes ``RequestFailed``: the status code, the
server's message and its field violations (``google.rpc.BadRequest`` details,
read with grpcio-status), which the app prints as ``field: message`` lines and
exits 1 on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DEFAULT_ADDR = "127.0.0.1:50051"
# One request and its answer; a page of a list is at most 1000 records.
UNARY_DEADLINE_SECONDS = 30.0
# Generating or exporting a million codes takes a while on a small machine.
BULK_DEADLINE_SECONDS = 900.0
PAGE_SIZE = 1000

Request = TypeVar("Request", bound=Message)
Reply = TypeVar("Reply", bound=Message)
Item = TypeVar("Item")


@dataclass
class RequestFailed(Exception):
    """The server refused the request, or could not be reached."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def lines(self) -> list[str]:
        """What a person reads: the status and message, or the status and one ``field: message`` line per violation."""
        if self.violations:
            # The message repeats the violations ("a: ...; b: ..."): one line each reads better.
            return [f"error: {self.code.name}", *(f"{name}: {text}" for name, text in self.violations)]
        return [f"error: {self.code.name}: {self.message}" if self.message else f"error: {self.code.name}"]


def request_failed(error: grpc.RpcError, addr: str) -> RequestFailed:
    """The status, message and field violations of a failed call."""
    call = error if isinstance(error, grpc.Call) else None
    if call is None:  # a failure before any call was made
        return RequestFailed(grpc.StatusCode.UNKNOWN, str(error))
    code = call.code()
    message = call.details() or ""
    violations: list[tuple[str, str]] = []
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details inconsistent with the status: show the status alone
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [(v.field, v.description) for v in bad_request.field_violations]
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the attribution service at {addr} ({message})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"no answer from {addr} in time ({message}); --timeout gives it longer"
    return RequestFailed(code, message, violations)


@dataclass(frozen=True)
class Tls:
    """The services' TLS settings as a client uses them (README, gRPC transport): read from the same files."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tls | None:
        """None without ``ASCRIBE_TLS_CA`` (plaintext); OSError for a file that cannot be read."""
        ca = env.get("ASCRIBE_TLS_CA")
        if not ca:
            return None
        cert, key = env.get("ASCRIBE_TLS_CERT"), env.get("ASCRIBE_TLS_KEY")
        # A client certificate is presented when there is one: mutual TLS needs it, TLS ignores it.
        return cls(
            ca=Path(ca).read_bytes(),
            cert=Path(cert).read_bytes() if cert and key else None,
            key=Path(key).read_bytes() if cert and key else None,
            server_name=env.get("ASCRIBE_TLS_SERVER_NAME") or None,
        )

    def channel(self, addr: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(addr, credentials, options=options)


class Client:
    """One channel to the attribution service, closed with the ``with`` block."""

    def __init__(
        self, addr: str, token: str | None = None, timeout: float | None = None, tls: Tls | None = None
    ) -> None:
        self.addr = addr
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = tls.channel(addr) if tls else grpc.insecure_channel(addr)
        self.catalog = attribution_pb2_grpc.CatalogServiceStub(self._channel)
        self.tracking = attribution_pb2_grpc.TrackingServiceStub(self._channel)
        self.experiments = attribution_pb2_grpc.ExperimentServiceStub(self._channel)
        self.reports = attribution_pb2_grpc.ReportServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._channel.close()

    def deadline(self, default: float = UNARY_DEADLINE_SECONDS) -> float:
        """Seconds a call may take: ``--timeout`` when given, else the call's own default."""
        return self._timeout if self._timeout is not None else default

    def call(self, method: grpc.UnaryUnaryMultiCallable[Request, Reply], request: Request) -> Reply:
        try:
            return method(request, timeout=self.deadline(), metadata=self._metadata)
        except grpc.RpcError as error:
            raise request_failed(error, self.addr) from None

    def start(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Reply], request: Request, timeout: float
    ) -> Pending[Reply]:
        """Starts a long call whose caller shows progress meanwhile."""
        return Pending(method.future(request, timeout=timeout, metadata=self._metadata), self.addr)

    def stream(
        self, method: grpc.UnaryStreamMultiCallable[Request, Reply], request: Request, timeout: float
    ) -> Iterator[Reply]:
        replies = method(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from replies
        except grpc.RpcError as error:
            raise request_failed(error, self.addr) from None
        finally:
            replies.cancel()

    def upload(
        self, method: grpc.StreamUnaryMultiCallable[Request, Reply], requests: Iterator[Request], timeout: float
    ) -> Reply:
        """A client-streaming call: ``requests`` go out as they are read, one answer comes back."""
        try:
            return method(requests, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise request_failed(error, self.addr) from None


class Pending(Generic[Reply]):
    """A call under way: ``answer()`` is None until it ends, then its reply (or RequestFailed)."""

    def __init__(self, future: grpc.Future[Reply], addr: str) -> None:
        self._future = future
        self._addr = addr

    def answer(self) -> Reply | None:
        if not self._future.done():
            return None
        try:
            return self._future.result()
        except grpc.RpcError as error:
            raise request_failed(error, self._addr) from None

    def cancel(self) -> None:
        self._future.cancel()


def every_page(fetch: Callable[[str], tuple[Iterable[Item], str]]) -> Iterator[Item]:
    """Every item of a paged list: ``fetch(page_token)`` answers one page and the next page's token."""
    token = ""
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


def exported_codes(replies: Iterable[pb.ExportCodesChunk]) -> Iterator[str]:
    """The codes of an ExportCodes stream (many codes a message)."""
    for chunk in replies:
        yield from chunk.codes
