"""Each service, started alone as a real process, stops on SIGTERM within 5 s with exit code 0."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tools.stack import Stack, http_ok, port_open

pytestmark = pytest.mark.slow



def _wait_live(stack: Stack, name: str, timeout: float = 30.0) -> None:
    """The gateway alone is live but not ready (no attribution service): wait for /healthz."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert stack.running(name), f"{name} exited while starting"
        if http_ok(f"{stack.gateway_url}/healthz"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not answer /healthz within {timeout:.0f}s")


@pytest.mark.parametrize("name", ["fraud", "attribution", "gateway"])
async def test_service_stops_on_sigterm(
    name: str, database_url: str, redis_server_url: str, ipintel_dir: Path, tmp_path: Path
) -> None:
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path,
        env={"ASCRIBE_IPINTEL_DIR": str(ipintel_dir)},
    )
    try:
        if name == "gateway":
            stack.start_service(name, wait=False)
            _wait_live(stack, name)
        else:
            stack.start_service(name)
        started = time.monotonic()
        code = stack.stop_service(name, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        stack.stop()
    assert code == 0, f"{name} exited with {code}; log:\n{stack.log_path(name).read_text()[-3000:]}"
    assert elapsed < 5.0, f"{name} took {elapsed:.1f}s to stop"
    assert not [port for port in stack.ports.of(name) if port_open(port)]
