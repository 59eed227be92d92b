"""The embedded Redis: started means loaded, and its append-only file cannot grow without bound."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from services.common import embedded

VALUE = b"x" * 1024


def _aof_size(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in data_dir.glob("appendonly*.aof*"))


def _churn(client: redis.Redis, megabytes: int) -> None:
    """Writes ``megabytes`` to the append-only file while the data stays tiny (every key deleted again)."""
    for batch in range(megabytes):
        pipe = client.pipeline(transaction=False)
        for i in range(1024):
            pipe.set(f"churn:{batch}:{i}", VALUE)
            pipe.delete(f"churn:{batch}:{i}")
        pipe.execute()


def test_the_append_only_file_is_rewritten_while_it_runs(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path / "redis")
    written = embedded.REDIS_AOF_REWRITE_MIN_SIZE + 4 * 1024 * 1024
    try:
        client = redis.Redis(port=server.port)
        _churn(client, written // (1024 * 1024))
        # Past the threshold Redis rewrites by itself: what remains is the live
        # data (nearly nothing) and the writes made while it rewrote.
        deadline = time.monotonic() + 30
        while _aof_size(server.data_dir) > written // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _aof_size(server.data_dir) <= written // 2
        client.close()
    finally:
        server.stop()


def test_a_restart_waits_for_the_data_to_load_then_compacts_a_bloated_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    # A file written without automatic rewrites, like the ones earlier versions left behind.
    server = embedded.start_redis(data_dir, extra_args=["--auto-aof-rewrite-percentage", "0"])
    try:
        client = redis.Redis(port=server.port)
        client.set("acknowledged", b"kept")
        _churn(client, 48)
        client.close()
    finally:
        server.stop()
    bloated = _aof_size(data_dir)
    assert bloated > 48 * 1024 * 1024

    server = embedded.start_redis(data_dir, port=server.port)
    try:
        client = redis.Redis(port=server.port)
        # Started means loaded: the first command is answered, not refused with LOADING.
        assert client.get("acknowledged") == b"kept"
        deadline = time.monotonic() + 30
        while _aof_size(data_dir) >= 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.1)
        compacted = _aof_size(data_dir)
        assert compacted < 1024 * 1024, (bloated, compacted)
        assert client.get("acknowledged") == b"kept"
        client.close()
    finally:
        server.stop()


def test_start_returns_only_once_the_data_is_loaded(tmp_path: Path) -> None:
    """Redis listens before it has loaded its file; started means loaded (no LOADING for the first callers)."""
    data_dir = tmp_path / "redis"
    server = embedded.start_redis(data_dir)
    try:
        client = redis.Redis(port=server.port)
        pipe = client.pipeline(transaction=False)
        for i in range(10_000):
            pipe.set(f"k{i}", "v")
        pipe.execute()
        client.close()
    finally:
        server.stop()

    started = time.monotonic()
    # key-load-delay (Redis's own testing setting) slows the load to about a second.
    server = embedded.start_redis(data_dir, port=server.port, extra_args=["--key-load-delay", "100"])
    try:
        took = time.monotonic() - started
        client = redis.Redis(port=server.port, socket_timeout=10)
        assert client.info("persistence")["loading"] == 0, took
        assert client.dbsize() == 10_000
        client.close()
    finally:
        server.stop()
