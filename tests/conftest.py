"""Real servers for tests: each test gets its own database and Redis key space.

PostgreSQL and Redis come from ASCRIBE_TEST_DATABASE_URL / ASCRIBE_TEST_REDIS_URL
when set, otherwise from embedded servers started once per session under a
temporary folder (never `make run`'s `.data/`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.attribution.migrate import migrate_url
from services.common import embedded
from services.fraud.ipintel import REPOSITORY_LISTS, IpIntelHolder
from tests.support import TEST_REPORTS

REPO = Path(__file__).resolve().parent.parent

# Every test, and every service process a test starts, reads the repository's
# snapshot of the IP lists: results must not depend on a developer's
# `make ipintel` download (.data/ipintel) or on anything outside the checkout.
# Tests of the choice made when the variable is unset remove it themselves.
os.environ["ASCRIBE_IPINTEL_DIR"] = str(REPOSITORY_LISTS)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ascribe-test-"))
    yield path
    embedded.remove_tree(path)


@pytest.fixture(scope="session")
def pg_server_url(embedded_dir: Path) -> Iterator[str]:
    configured = os.environ.get("ASCRIBE_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    server = embedded.start_postgres(embedded_dir / "pg")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server_url(embedded_dir: Path) -> Iterator[str]:
    configured = os.environ.get("ASCRIBE_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    server = embedded.start_redis(embedded_dir / "redis")
    try:
        yield server.url
    finally:
        server.stop()


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10)


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"ascribe_tpl_{os.getpid()}_{secrets.token_hex(3)}"

    async def create() -> None:
        conn = await _admin(pg_server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate_url(with_database(pg_server_url, name))

    async def drop() -> None:
        conn = await _admin(pg_server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def database_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own, dropped afterwards."""
    name = f"ascribe_t_{secrets.token_hex(6)}"
    conn = await _admin(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    yield with_database(pg_server_url, name)
    conn = await _admin(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_db(pg_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a new database with no migration applied (upgrades, migrate() itself), dropped afterwards."""
    name = f"ascribe_e_{secrets.token_hex(6)}"
    admin = await _admin(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(pg_server_url, name), timeout=10)
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    await conn.execute("SET TIME ZONE 'UTC'")
    yield conn
    await conn.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own (its Redis key space)."""
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
async def redis_client(redis_server_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.unlink(*keys[start : start + 1000])
    await client.aclose()


@pytest.fixture(scope="session")
def ipintel_dir() -> Path:
    return REPOSITORY_LISTS


@pytest.fixture(scope="session")
def shared_intel(ipintel_dir: Path) -> IpIntelHolder:
    """The lists loaded once for every in-process fraud service (a load takes about half a second)."""
    return IpIntelHolder(ipintel_dir)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, lines in TEST_REPORTS.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
