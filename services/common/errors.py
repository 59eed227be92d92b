"""Domain exceptions, each carrying the gRPC status code it maps to.

Servicers raise these; the one interceptor in ``grpc_server`` turns them into
statuses (with ``google.rpc.BadRequest`` details for field violations).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class DomainError(Exception):
    """A failure the caller can understand; the message is safe to show."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """Bad input; ``violations`` names each offending field."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[tuple[str, str]]) -> None:
        self.violations = list(violations)
        if not self.violations:
            raise ValueError("InvalidArgument needs at least one violation")
        super().__init__(
            "; ".join(f"{field}: {description}" for field, description in self.violations)
        )

    @property
    def field(self) -> str:
        return self.violations[0][0]

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([(field, description)])


class NotFound(DomainError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(DomainError):
    status = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(DomainError):
    status = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    """A caller over its rate; ``retry_after_seconds`` travels as google.rpc.RetryInfo."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Violations:
    """Collects field violations so a request reports all of them at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
