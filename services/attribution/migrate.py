"""Numbered SQL migrations, applied once each under an advisory lock.

Every replica runs this at start-up; the lock makes concurrent starts safe
(one applies, the others wait and then find nothing left to do).
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


async def migrate(conn: Connection) -> list[int]:
    """Applies pending migrations; returns the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version int PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
            logger.info("applied migration %s", path.name)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
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
