"""The caller's deadline, carried to every call made on its behalf (issue #19).

The server interceptor (``grpc_server``) records when the RPC's caller gives up
(``context.time_remaining()``) in a context variable; an outgoing call made
for that RPC (the fraud service, PostgreSQL) is then bounded by
``bound(configured)``: the smaller of its own configured deadline and the
caller's remaining time, less a margin so the service can still answer (a
fail-open FLAGGED) before the caller's deadline instead of
DEADLINE_EXCEEDED. An RPC whose deadline has already passed is not started.

Batches: a MicroBatcher flush works for many callers at once, so it runs
under the *latest* of its items' deadlines (``batch_context``): once every
caller has gone, the work is useless; while one still waits, its deadline
is the bound. An item without a caller deadline (a background job, the
gateway) leaves the batch bounded by its own configured deadline only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable

import grpc

from services.common.errors import DomainError

# The caller's deadline as a time.monotonic() instant; None: no caller deadline.
_CALLER_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "ascribe_caller_deadline", default=None
)

# Time kept back from an outgoing call for the work after it (a commit, the
# answer): a tenth of the caller's remaining time, at least 5 ms.
_MARGIN_SHARE = 0.1
_MARGIN_SECONDS = 0.005


class DeadlineExceeded(DomainError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


def enter(remaining: float | None) -> contextvars.Token[float | None]:
    """Records the caller's remaining time (``context.time_remaining()``) for this task."""
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the caller's deadline passed before the call started")
    return _CALLER_DEADLINE.set(None if remaining is None else time.monotonic() + remaining)


def leave(token: contextvars.Token[float | None]) -> None:
    _CALLER_DEADLINE.reset(token)


def caller_deadline() -> float | None:
    """When the caller of the current RPC (or the latest caller of this batch) gives up."""
    return _CALLER_DEADLINE.get()


def bound(configured: float, *, deadline: float | None = None, now: float | None = None) -> float:
    """An outgoing call's timeout: min(configured, the caller's remaining time less a margin).

    May be 0 or less: the caller has (all but) gone and the call should not be made.
    """
    at = caller_deadline() if deadline is None else deadline
    if at is None:
        return configured
    remaining = at - (time.monotonic() if now is None else now)
    return min(configured, remaining - max(_MARGIN_SECONDS, remaining * _MARGIN_SHARE))


def latest(deadlines: Iterable[float | None]) -> float | None:
    """A batch's deadline: the latest of its callers'; None when any item has none."""
    result: float | None = None
    for deadline in deadlines:
        if deadline is None:
            return None
        result = deadline if result is None else max(result, deadline)
    return result


def batch_context(deadlines: Iterable[float | None]) -> contextvars.Context:
    """A context for a batch's task: the current one with the batch's deadline in place.

    Without it a flush task would inherit whichever caller's deadline was
    current when the task was scheduled.
    """
    context = contextvars.copy_context()
    context.run(_CALLER_DEADLINE.set, latest(deadlines))
    return context


def background_context() -> contextvars.Context:
    """A context for a task that outlives its RPC: no caller deadline bounds its calls."""
    return batch_context([None])


def message_context(timeout_seconds: float | None) -> contextvars.Context:
    """A context for one stream message carrying its sender's remaining time (batch_stream)."""
    return batch_context([None if timeout_seconds is None else time.monotonic() + timeout_seconds])
