"""`make run` (python -m tools.run) as a real process on fresh data and free ports, for the e2e tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.stack import REPO, Ports, grpc_serving, http_ok

ROLES = ("fraud", "attribution", "gateway", "postgres", "redis")


def process_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, command line) of every live, non-zombie process."""
    table: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), argv)
    return table


def role_of(argv: list[str]) -> str | None:
    if len(argv) > 2 and argv[1] == "-m":
        return {"services.fraud": "fraud", "services.attribution": "attribution", "gateway": "gateway"}.get(argv[2])
    if Path(argv[0]).name == "postgres":
        return "postgres"
    if "redis-server" in argv[0]:
        return "redis"
    return None


@dataclass
class MakeRun:
    data_dir: Path
    ipintel_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: Ports = field(default_factory=Ports.free)
    process: subprocess.Popen[bytes] | None = None

    @property
    def out_path(self) -> Path:
        return self.data_dir / "run.out"

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{getattr(self.ports, name)}"

    def start(self) -> MakeRun:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("ASCRIBE_DATABASE_URL", "ASCRIBE_REDIS_URL")}
        env.update(
            PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'gen'}",
            ASCRIBE_DATA_DIR=str(self.data_dir),
            ASCRIBE_IPINTEL_DIR=str(self.ipintel_dir),
            ASCRIBE_ATTRIBUTION_ADDR=self.addr("attribution"),
            ASCRIBE_FRAUD_ADDR=self.addr("fraud"),
            ASCRIBE_GATEWAY_PORT=str(self.ports.gateway),
            ASCRIBE_ATTRIBUTION_METRICS_PORT=str(self.ports.attribution_metrics),
            ASCRIBE_FRAUD_METRICS_PORT=str(self.ports.fraud_metrics),
            ASCRIBE_GATEWAY_METRICS_PORT=str(self.ports.gateway_metrics),
        )
        env.update(self.extra_env)
        with self.out_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tools.run"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def ready(self) -> bool:
        # The run's own word first: before it, the supervisor is still starting
        # units, and a test that kills one then races its start-up.
        return (
            "ascribe: ready in " in self.output()
            and http_ok(f"{self.gateway_url}/readyz")
            and grpc_serving(self.addr("attribution"))
            and grpc_serving(self.addr("fraud"))
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"tools.run exited with {self.process.returncode}:\n{self.output()}"
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout:.0f}s:\n{self.output()}")

    def pids(self) -> dict[str, int]:
        """The supervised processes, by role: direct children of the run."""
        assert self.process is not None
        found = {}
        for pid, (parent, argv) in process_table().items():
            role = role_of(argv) if parent == self.process.pid else None
            if role is not None:
                found[role] = pid
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            children = self.pids()
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # A hung run must not leave servers behind for the next test.
                self.process.kill()
                self.process.wait()
                for pid in children.values():
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
        return self.process.returncode
