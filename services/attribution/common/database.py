"""What PostgreSQL's failures mean to the attribution service, in one place.

``DATABASE_UNAVAILABLE`` is every error that says the database is down, restarting
or too slow: the caller gets UNAVAILABLE and may retry. ``retry_aborted`` runs a
transaction again when PostgreSQL aborted it to break a deadlock or a
serialization conflict, which a second attempt usually wins.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A connection of our own or one borrowed from the pool (a proxy to it): the
# store functions take either.
Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"
# Where a read can run: a connection, or the pool (which lends one for the call).
Executor: TypeAlias = "Connection | asyncpg.Pool"

# PostgreSQL down, restarting, or too slow for the statement timeout.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # Class 57: the server is shutting down, restarting or cancelled the
    # statement (its timeout): AdminShutdownError reaches connections that sat
    # idle in the pool while PostgreSQL stopped.
    asyncpg.exceptions.OperatorInterventionError,
    # Retried where they can happen (``retry_aborted``); should one still
    # escape, a retry by the caller succeeds.
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

# Any failure of a read on a hot path (a catalog lookup, a click read): the
# reader cannot tell a broken statement from a broken server, and the event is
# not lost when its caller retries, so all of them answer UNAVAILABLE.
DATABASE_FAILURES: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *DATABASE_UNAVAILABLE)

# Aborted by PostgreSQL to break a deadlock or a serialization conflict.
ABORTED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
ATTEMPTS = 3


async def retry_aborted(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Runs ``operation`` (one transaction) up to ``ATTEMPTS`` times while PostgreSQL aborts it.

    ``what`` names the change in the log and in the UNAVAILABLE raised when
    every attempt was aborted.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await operation()
        except ABORTED as error:
            logger.warning("%s retried after %s (attempt %d)", what, type(error).__name__, attempt)
    raise Unavailable(f"the database kept aborting the {what}; retry")
