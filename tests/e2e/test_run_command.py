"""`make run` (python -m tools.run) on fresh data: ready, then stopped by a signal, leaving nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.stack import REPO, Ports, grpc_serving, http_ok, port_open

pytestmark = pytest.mark.slow



def _descendants(root: int) -> dict[int, list[str]]:
    """Every live process below ``root``, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, list[str]] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        try:
            found[pid] = (Path(f"/proc/{pid}") / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        stack.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening_ports(cmdlines: dict[int, list[str]]) -> set[int]:
    """The embedded servers' ports, read from their command lines (-p for postgres, --port for redis)."""
    ports = set()
    for argv in cmdlines.values():
        for flag in ("-p", "--port"):
            if flag in argv[:-1]:
                ports.add(int(argv[argv.index(flag) + 1]))
    return ports


def _start_run(data_dir: Path, ports: Ports, ipintel_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("ASCRIBE_DATABASE_URL", "ASCRIBE_REDIS_URL")}
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'gen'}",
        ASCRIBE_DATA_DIR=str(data_dir),
        ASCRIBE_IPINTEL_DIR=str(ipintel_dir),
        ASCRIBE_ATTRIBUTION_ADDR=f"127.0.0.1:{ports.attribution}",
        ASCRIBE_FRAUD_ADDR=f"127.0.0.1:{ports.fraud}",
        ASCRIBE_GATEWAY_PORT=str(ports.gateway),
        ASCRIBE_ATTRIBUTION_METRICS_PORT=str(ports.attribution_metrics),
        ASCRIBE_FRAUD_METRICS_PORT=str(ports.fraud_metrics),
    )
    with (data_dir / "run.out").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tools.run"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _wait_ready(run: subprocess.Popen[bytes], ports: Ports, data_dir: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, f"tools.run exited with {run.returncode}:\n{(data_dir / 'run.out').read_text()}"
        if (
            http_ok(f"http://127.0.0.1:{ports.gateway}/readyz")
            and grpc_serving(f"127.0.0.1:{ports.attribution}")
            and grpc_serving(f"127.0.0.1:{ports.fraud}")
        ):
            return
        time.sleep(0.2)
    run.kill()
    raise AssertionError(f"not ready within {timeout:.0f}s:\n{(data_dir / 'run.out').read_text()}")


def test_run_starts_everything_and_stops_cleanly_three_times(tmp_path: Path, ipintel_dir: Path) -> None:
    """Stopped by SIGINT, SIGTERM and SIGHUP (its terminal closed) alike.

    Each run reuses the embedded servers' data: it must still be valid after the previous stop.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        ports = Ports.free()
        run = _start_run(tmp_path, ports, ipintel_dir)
        try:
            _wait_ready(run, ports, tmp_path)
            processes = _descendants(run.pid)
            assert len(processes) >= 5, processes  # three services, PostgreSQL, Redis
            started = time.monotonic()
            run.send_signal(sig)
            code = run.wait(timeout=15)
            elapsed = time.monotonic() - started
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        output = (tmp_path / "run.out").read_text()
        assert code == 0, output
        assert elapsed < 10.0, f"{sig.name}: stopping took {elapsed:.1f}s\n{output}"
        time.sleep(0.2)
        assert not [pid for pid in processes if _alive(pid)], processes
        every_port = [
            ports.attribution, ports.fraud, ports.gateway, ports.attribution_metrics, ports.fraud_metrics,
            *_listening_ports(processes),
        ]
        assert not [port for port in every_port if port_open(port)]
