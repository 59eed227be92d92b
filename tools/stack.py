"""Runs the three services as real child processes: `make run`, e2e tests, benchmarks.

    stack = Stack(database_url=..., redis_url=..., log_dir=tmp_path)   # free ports
    stack.start()                     # fraud -> attribution -> gateway, each ready
    stack.gateway_url, stack.addr("attribution"), stack.pid("fraud")
    stack.stop_service("fraud"); stack.kill_service("attribution", signal.SIGKILL)
    stack.start_service("attribution")
    stack.stop()                      # reverse order, SIGTERM then SIGKILL

Each child gets its own session (so a Ctrl-C in the terminal reaches only our
launcher, which then stops the children in order) and, when started from the
main thread, PR_SET_PDEATHSIG (so a launcher that is itself killed still
leaves no orphan behind). Methods block; from asyncio, call them through
asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("fraud", "attribution", "gateway")
MODULES = {"fraud": "services.fraud", "attribution": "services.attribution", "gateway": "gateway"}
HOST = "127.0.0.1"

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A service did not start, or did not become ready, in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def grpc_serving(addr: str, timeout: float = 1.0, service: str = "") -> bool:
    """True when the server at ``addr`` answers grpc.health.v1 Check with SERVING."""
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class Ports:
    attribution: int
    fraud: int
    gateway: int
    attribution_metrics: int
    fraud_metrics: int
    gateway_metrics: int

    @classmethod
    def free(cls) -> Ports:
        """Kernel-chosen free ports, so parallel stacks never collide.

        All six are held open until all are chosen: one at a time, the kernel
        may hand back a port it has just handed out, and two services of one
        stack would be given the same port.
        """
        with contextlib.ExitStack() as held:
            sockets = [held.enter_context(socket.socket()) for _ in fields(cls)]
            for sock in sockets:
                sock.bind((HOST, 0))
            return cls(*(int(sock.getsockname()[1]) for sock in sockets))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ports:
        """The ports of ARCHITECTURE.md section 3, overridable by the same variables."""

        def port_of(addr_var: str, default: str) -> int:
            return int((env.get(addr_var) or default).rpartition(":")[2])

        return cls(
            attribution=port_of("ASCRIBE_ATTRIBUTION_ADDR", "127.0.0.1:50051"),
            fraud=port_of("ASCRIBE_FRAUD_ADDR", "127.0.0.1:50052"),
            gateway=int(env.get("ASCRIBE_GATEWAY_PORT") or 8080),
            attribution_metrics=int(env.get("ASCRIBE_ATTRIBUTION_METRICS_PORT") or 9101),
            fraud_metrics=int(env.get("ASCRIBE_FRAUD_METRICS_PORT") or 9102),
            gateway_metrics=int(env.get("ASCRIBE_GATEWAY_METRICS_PORT") or 9103),
        )

    def of(self, name: str) -> list[int]:
        """Every port the service ``name`` listens on."""
        return {
            "fraud": [self.fraud, self.fraud_metrics],
            "attribution": [self.attribution, self.attribution_metrics],
            "gateway": [self.gateway, self.gateway_metrics],
        }[name]


# Sets PR_SET_PDEATHSIG, then becomes the service (execv keeps the setting):
# the kernel sends SIGTERM when the launcher dies, even by SIGKILL, so a
# child can never outlive it. A separate step instead of Popen's preexec_fn:
# Python code between fork and exec in a process with threads (gRPC's, once
# a health check ran) can hang forever on a lock another thread held at the
# fork, and Popen with it; without preexec_fn the fork is a plain vfork+exec.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the launcher died before the setting took\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class Stack:
    """The services as child processes on loopback, with their logs in ``log_dir``."""

    database_url: str
    redis_url: str
    log_dir: Path
    ports: Ports = field(default_factory=Ports.free)
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 30.0
    _children: dict[str, _Child] = field(default_factory=dict, init=False, repr=False)

    # ---------------------------------------------------------------- addresses

    def addr(self, name: str) -> str:
        """``host:port`` of a gRPC service (``fraud`` or ``attribution``)."""
        return f"{HOST}:{getattr(self.ports, name)}"

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.ports.gateway}"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of a running service, None when it is not running."""
        child = self._children.get(name)
        if child is None or child.process.poll() is not None:
            return None
        return child.process.pid

    def pids(self) -> dict[str, int]:
        return {name: pid for name in SERVICES if (pid := self.pid(name)) is not None}

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    def exited(self) -> dict[str, int]:
        """Services started by us that have exited since, with their exit codes."""
        return {
            name: code for name, child in self._children.items()
            if (code := child.process.poll()) is not None
        }

    def environment(self, name: str) -> dict[str, str]:
        """The environment ``name`` runs with: ours, the stack's settings, then ``env``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "gen"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.update(
            ASCRIBE_DATABASE_URL=self.database_url,
            ASCRIBE_REDIS_URL=self.redis_url,
            ASCRIBE_ATTRIBUTION_ADDR=self.addr("attribution"),
            ASCRIBE_FRAUD_ADDR=self.addr("fraud"),
            ASCRIBE_GATEWAY_HOST=HOST,
            ASCRIBE_GATEWAY_PORT=str(self.ports.gateway),
            ASCRIBE_ATTRIBUTION_METRICS_PORT=str(self.ports.attribution_metrics),
            ASCRIBE_FRAUD_METRICS_PORT=str(self.ports.fraud_metrics),
            ASCRIBE_GATEWAY_METRICS_PORT=str(self.ports.gateway_metrics),
        )
        env.update(self.env)
        return env

    # ---------------------------------------------------------------- lifecycle

    def start(self, services: Iterable[str] = SERVICES) -> Stack:
        """Starts ``services`` in dependency order, each ready before the next."""
        wanted = set(services)
        try:
            for name in SERVICES:
                if name in wanted:
                    self.start_service(name)
        except BaseException:
            self.stop()
            raise
        return self

    def start_service(self, name: str, *, wait: bool = True) -> int:
        """Starts one service; with ``wait``, returns once it is ready. Returns its pid."""
        if name not in MODULES:
            raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
        if self.running(name):
            raise StackError(f"{name} is already running (pid {self.pid(name)})")
        busy = [port for port in self.ports.of(name) if port_open(port)]
        if busy:
            # gRPC binds with SO_REUSEPORT: without this check a second server
            # would silently share the port with whatever already holds it.
            raise StackError(f"cannot start {name}: port(s) {busy} already in use on {HOST}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(name).open("ab")
        log.write(f"--- starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        log.flush()
        command = [sys.executable, "-m", MODULES[name]]
        process = subprocess.Popen(
            # The kernel ties PDEATHSIG to the creating *thread*: from a worker
            # thread (asyncio.to_thread) the child would die with that thread.
            _die_with_parent(command) if threading.current_thread() is threading.main_thread() else command,
            cwd=REPO,
            env=self.environment(name),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._children[name] = _Child(process, log)
        if wait:
            self.wait_ready(name)
        return process.pid

    def is_ready(self, name: str) -> bool:
        if name == "gateway":
            return http_ok(f"{self.gateway_url}/readyz")
        return grpc_serving(self.addr(name))

    def wait_ready(self, name: str, timeout: float | None = None) -> None:
        """Waits for gRPC health SERVING (or the gateway's /readyz 200); raises with the log tail."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        child = self._children[name]
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {child.process.returncode} while starting; "
                    f"last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}"
                )
            if self.is_ready(name):
                return
            time.sleep(0.05)
        raise StackError(
            f"{name} not ready within {timeout or self.ready_timeout:.0f}s; "
            f"last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}"
        )

    def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to a service without waiting (``kill -9`` by default)."""
        child = self._children.get(name)
        if child is not None and child.process.poll() is None:
            _signal_group(child.process.pid, sig)
            if sig == signal.SIGKILL:
                child.process.wait(5)

    def stop_service(self, name: str, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        codes = self._stop([name], timeout)
        return codes.get(name)

    def restart_service(self, name: str, *, wait: bool = True) -> int:
        self.stop_service(name)
        return self.start_service(name, wait=wait)

    def stop(self, timeout: float = 8.0) -> dict[str, int | None]:
        """Stops every service, gateway first, within ``timeout`` overall; returns exit codes."""
        return self._stop([name for name in reversed(SERVICES) if name in self._children], timeout)

    def _stop(self, names: list[str], timeout: float) -> dict[str, int | None]:
        # One deadline for all: each service gets what the ones before it left,
        # so a hung service cannot stretch the whole stop past ``timeout``.
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name in names:
            child = self._children.pop(name, None)
            if child is None:
                continue
            process = child.process
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.log.write(f"--- {name} ignored SIGTERM for {timeout:.0f}s: SIGKILL\n".encode())
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait(5)
            # Anything the service itself spawned goes with it.
            _signal_group(process.pid, signal.SIGKILL)
            child.log.close()
            codes[name] = process.returncode
        return codes

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    # Each child leads its own session, so its pid is its process group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)

