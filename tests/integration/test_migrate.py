"""Migrations on real PostgreSQL: one transaction each, or statement by statement when a file says so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.attribution.migrate import migrate, statements_without_transaction
from tests.conftest import with_database


def test_a_file_without_a_transaction_splits_at_line_ends_and_keeps_no_empty_statement() -> None:
    text = (
        "-- ascribe: no transaction\n-- why\nCREATE INDEX CONCURRENTLY a ON t (x);\n\n"
        "-- the next one\nDROP INDEX CONCURRENTLY IF EXISTS b;  \n-- trailing words\n"
    )
    assert statements_without_transaction(text, "x.sql") == [
        "-- ascribe: no transaction\n-- why\nCREATE INDEX CONCURRENTLY a ON t (x)",
        "-- the next one\nDROP INDEX CONCURRENTLY IF EXISTS b",
    ]
    with pytest.raises(RuntimeError, match="function bodies"):
        statements_without_transaction("-- ascribe: no transaction\nCREATE FUNCTION f() AS $$ x; $$;", "f.sql")
    with pytest.raises(RuntimeError, match="function bodies"):
        statements_without_transaction("-- ascribe: no transaction\nDO $go$ BEGIN NULL; END $go$;", "g.sql")
    with pytest.raises(RuntimeError, match="alone on its line"):
        statements_without_transaction("-- ascribe: no transaction\nSELECT 1; -- two in one\nSELECT 2;", "h.sql")


async def test_concurrent_index_builds_run_and_a_failure_part_way_is_run_again(
    empty_db: asyncpg.Connection, tmp_path: Path
) -> None:
    (tmp_path / "001_table.sql").write_text("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000);")
    (tmp_path / "002_index.sql").write_text(
        "-- ascribe: no transaction\n"
        "DROP INDEX CONCURRENTLY IF EXISTS t_x;\n"
        "CREATE INDEX CONCURRENTLY t_x ON t (x);\n"
        "INSERT INTO t VALUES (1 / (SELECT count(*) - 1000 FROM t));\n"  # fails on the first run only
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, tmp_path)
    # 001 is recorded, 002 not: its index was built and committed before the failure
    assert [r["version"] for r in await empty_db.fetch("SELECT version FROM schema_migrations")] == [1]
    await empty_db.execute("INSERT INTO t VALUES (0)")
    assert await migrate(empty_db, tmp_path) == [2]
    assert await empty_db.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass"
    ) is True
    assert await migrate(empty_db, tmp_path) == []


async def test_replicas_starting_together_wait_for_a_concurrent_index_build_without_a_deadlock(
    empty_db: asyncpg.Connection, pg_server_url: str, tmp_path: Path
) -> None:
    (tmp_path / "001_table.sql").write_text("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000);")
    (tmp_path / "002_index.sql").write_text(
        "-- ascribe: no transaction\n"
        "SELECT pg_sleep(1);\n"  # the other replicas are waiting for the lock by now
        "CREATE INDEX CONCURRENTLY t_x ON t (x);\n"
    )
    url = with_database(pg_server_url, await empty_db.fetchval("SELECT current_database()"))
    others = [await asyncpg.connect(url, timeout=10) for _ in range(2)]
    try:
        # A waiter in pg_advisory_lock held a snapshot the index build waited
        # for while the waiter waited for the builder's lock: deadlock detected.
        applied = await asyncio.gather(migrate(empty_db, tmp_path), *(migrate(c, tmp_path) for c in others))
    finally:
        for conn in others:
            await conn.close()
    assert sorted(applied) == [[], [], [1, 2]]
    assert await empty_db.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass") is True


async def test_up_to_stops_at_a_version(empty_db: asyncpg.Connection, tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "002_b.sql").write_text("CREATE TABLE b (x int);")
    assert await migrate(empty_db, tmp_path, up_to=1) == [1]
    assert await migrate(empty_db, tmp_path) == [2]


async def test_a_migration_runs_past_the_connections_statement_timeout_which_comes_back(
    pg_server_url: str, empty_db: asyncpg.Connection, tmp_path: Path
) -> None:
    name = await empty_db.fetchval("SELECT current_database()")
    # As the service's pool connects: a 200 ms statement timeout as a start-up parameter.
    conn = await asyncpg.connect(with_database(pg_server_url, name), timeout=10,
                                 server_settings={"statement_timeout": "200"}, command_timeout=0.2)
    try:
        (tmp_path / "001_slow.sql").write_text("CREATE TABLE s AS SELECT 1 AS x FROM pg_sleep(0.5);")
        (tmp_path / "002_slow.sql").write_text(
            "-- ascribe: no transaction\nSET lock_timeout = '1s';\nSELECT pg_sleep(0.5);\n"
        )
        assert await migrate(conn, tmp_path) == [1, 2]
        assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "200ms"
        assert await conn.fetchval("SELECT current_setting('lock_timeout')") == "0"
    finally:
        await conn.close()
