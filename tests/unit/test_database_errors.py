"""Which PostgreSQL failures answer UNAVAILABLE (retry later) rather than INTERNAL."""

from __future__ import annotations

import asyncpg
import pytest

from services.attribution.common.database import DATABASE_UNAVAILABLE


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.AdminShutdownError,  # 57P01: the server is stopping (idle pooled connections get it)
        asyncpg.exceptions.CrashShutdownError,  # 57P02
        asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up
        asyncpg.exceptions.QueryCanceledError,  # 57014: the statement timeout
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.InterfaceError,
        ConnectionRefusedError,
    ],
)
def test_server_gone_or_slow_is_unavailable(error: type[BaseException]) -> None:
    assert issubclass(error, DATABASE_UNAVAILABLE)


@pytest.mark.parametrize(
    "error",
    [asyncpg.exceptions.UniqueViolationError, asyncpg.exceptions.UndefinedColumnError, asyncpg.exceptions.DataError],
)
def test_our_own_mistakes_are_not_disguised_as_outages(error: type[BaseException]) -> None:
    assert not issubclass(error, DATABASE_UNAVAILABLE)
