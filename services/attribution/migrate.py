"""Numbered SQL migrations, applied once each under an advisory lock.

Every replica runs this at start-up; the lock makes concurrent starts safe
(one applies, the others wait and then find nothing left to do).

A migration runs in one transaction, unless its first line is
``-- ascribe: no transaction``: then its statements run one by one, each
committed by itself, as ``CREATE INDEX CONCURRENTLY`` needs (an index built
on a large live table without keeping its writers waiting). Such a file is
split at every line that ends with ``;``, so it may hold no function bodies
(``$$``), and each statement must be safe to run again: a failure part-way
leaves the version unrecorded and the next start runs the file from the top.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path

import asyncpg

from services.attribution.common.database import Connection

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# An arbitrary constant shared by every replica: "ascribe migrations".
MIGRATION_LOCK_KEY = 0x61736372_6D696772
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


NO_TRANSACTION = "-- ascribe: no transaction"
# A migration may build an index over a large table for minutes: it runs
# without the pool's statement timeout (restored afterwards) and without
# asyncpg's command timeout, whatever connection it is given.
MIGRATION_TIMEOUT_S = 24 * 3600.0
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)
MIGRATION_LOCK_POLL_S = 0.2  # how often a replica that waits for another's migrations asks again


def statements_without_transaction(text: str, name: str) -> list[str]:
    """The statements of a ``-- ascribe: no transaction`` migration, in order (comments kept)."""
    if re.search(r"\$\w*\$", text):
        raise RuntimeError(f"{name}: a migration without a transaction cannot hold function bodies ($$)")
    if re.search(r";[ \t]*--", text):
        raise RuntimeError(f"{name}: a migration without a transaction ends each statement with ';' alone on its line")
    found = []
    for piece in _STATEMENT_END.split(text):
        code = [line for line in piece.splitlines() if line.strip() and not line.strip().startswith("--")]
        if code:
            found.append(piece.strip())
    return found


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    files = []
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match:
            files.append((int(match.group(1)), path))
    versions = [version for version, _ in files]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration numbers in {directory}")
    return files


async def _take_lock(conn: Connection) -> None:
    """The migration lock, asked for again and again rather than waited for in one statement.

    A replica waiting in ``pg_advisory_lock`` holds that statement's
    snapshot, and ``CREATE INDEX CONCURRENTLY`` in the replica that migrates
    waits for every older snapshot to end: each waited for the other, and
    PostgreSQL cancelled one (deadlock detected) whenever two replicas
    started together with such a migration pending. Between two tries the
    waiter holds no snapshot.
    """
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=10):
        await asyncio.sleep(MIGRATION_LOCK_POLL_S)


async def migrate(conn: Connection, directory: Path = MIGRATIONS_DIR, *, up_to: int | None = None) -> list[int]:
    """Applies pending migrations (those numbered ``up_to`` or less, when given); returns the versions applied now."""
    applied_now: list[int] = []
    try:
        await conn.execute("SET statement_timeout = 0", timeout=MIGRATION_TIMEOUT_S)
        await _take_lock(conn)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version int PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(directory):
            if version in done or (up_to is not None and version > up_to):
                continue
            text = path.read_text()
            if text.startswith(NO_TRANSACTION):
                for statement in statements_without_transaction(text, path.name):
                    await conn.execute(statement, timeout=MIGRATION_TIMEOUT_S)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
            else:
                async with conn.transaction():
                    await conn.execute(text, timeout=MIGRATION_TIMEOUT_S)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                    )
            logger.info("applied migration %s", path.name)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        # Back to the connection's own settings (a no-transaction file may SET lock_timeout).
        await conn.execute("RESET statement_timeout; RESET lock_timeout")
    return applied_now


async def migrate_url(url: str) -> list[int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def main() -> None:
    from services.attribution.config import database_url_from_env

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    applied = asyncio.run(migrate_url(database_url_from_env()))
    print(f"migrations applied: {applied or 'none pending'}", file=sys.stderr)


if __name__ == "__main__":
    main()
