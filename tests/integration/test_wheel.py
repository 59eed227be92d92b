"""`pip install .`: the wheel carries the services, the CLI entry point and the generated stubs.

Built from a copy of the checkout's sources without gen/ (setup.py runs
grpc_tools.protoc in pip's isolated build environment), then installed into a
clean venv with only the stubs' runtime (protobuf, grpcio at
requirements.txt's pins, with their own
dependencies), where the stubs import with the checkout off the
path. About 40 s with pip's cache warm: marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What pyproject.toml, setup.py and MANIFEST.in read: the checkout minus gen/,
# tests, the venv and caches.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "requirements.txt", "README.md")
TREES = ("protos", "services", "gateway", "tools", "ascribe_cli", "data/ipintel")
STUBS = (
    "ascribe/attribution/v1/attribution_pb2.py", "ascribe/attribution/v1/attribution_pb2_grpc.py",
    "ascribe/fraud/v1/fraud_pb2.py", "ascribe/fraud/v1/fraud_pb2_grpc.py",
    "ascribe/options/v1/limits_pb2.py",
)
# The IP lists' snapshot as the wheel carries it (setup.py; issue #16).
PACKAGED_IPINTEL = "services/fraud/ipintel_snapshot"
SNAPSHOT = REPO / "data" / "ipintel"


def _run(*args: str | Path, cwd: Path) -> str:
    # Without the Makefile's PYTHONPATH: through it the clean venv's pip sees the
    # checkout's ascribe.egg-info, says the wheel is "already satisfied" and
    # installs nothing (make test failed where pytest alone passed).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _pin(requirements: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==\S+$", (REPO / requirements).read_text(), re.MULTILINE)
    assert match, f"{name} is not pinned in {requirements}"
    return match.group(0)


def test_the_build_uses_the_pinned_stub_generator() -> None:
    """The stubs in a wheel come from the same grpcio-tools as make's gen/."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert _pin("requirements-dev.txt", "grpcio-tools") in requires


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        shutil.copy2(REPO / name, source / name)
    for tree in TREES:
        shutil.copytree(REPO / tree, source / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
         "--wheel-dir", out, source, cwd=source)
    (built,) = out.glob("ascribe-*.whl")
    return built


def test_the_wheel_carries_the_stubs_services_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            archive.read(name).decode() for name in names if name.endswith(".dist-info/entry_points.txt")
        )
    missing = [name for name in STUBS if name not in names]
    assert not missing, missing
    assert {"services/attribution/__main__.py", "services/fraud/__main__.py", "gateway/__main__.py",
            "gateway/openapi.json", "ascribe_cli/app.py"} <= names
    assert any(name.startswith("services/attribution/migrations/") and name.endswith(".sql") for name in names)
    assert any(name.startswith("services/fraud/lua/") for name in names)
    assert "ascribe = ascribe_cli:main" in entry_points
    assert not any(name.startswith(("tests/", "gen/")) for name in names)


def test_the_wheel_carries_the_ip_lists_snapshot_with_its_licences(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        tor = archive.read(f"{PACKAGED_IPINTEL}/tor-exit-nodes.txt")
    shipped = {
        f"{PACKAGED_IPINTEL}/{path.relative_to(SNAPSHOT)}" for path in SNAPSHOT.rglob("*") if path.is_file()
    }
    # Every file of the snapshot, the lists, README, SOURCES.tsv and licences alike, byte for byte.
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {f"{PACKAGED_IPINTEL}/{name}" for name in ("SOURCES.tsv", "README.md", "vpn-ipv4.txt")} <= shipped
    assert any(name.startswith(f"{PACKAGED_IPINTEL}/LICENSES/") for name in shipped)
    assert tor == (SNAPSHOT / "tor-exit-nodes.txt").read_bytes()


def _venv_with_wheel(wheel: Path, tmp_path: Path, *requirements: str) -> Path:
    """A clean venv under ``tmp_path`` with the wheel and the pinned ``requirements``; its python."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, "--no-deps", wheel, cwd=tmp_path)
    _run(*pip, *(_pin("requirements.txt", name) for name in requirements), cwd=tmp_path)
    return python


def test_the_installed_fraud_service_loads_the_packaged_ip_lists(wheel: Path, tmp_path: Path) -> None:
    """No checkout, no ASCRIBE_IPINTEL_DIR, no .data/ipintel: the signals are on."""
    python = _venv_with_wheel(wheel, tmp_path, "pytricia")
    venv = tmp_path / "venv"
    tor_exit = next(
        line for line in (SNAPSHOT / "tor-exit-nodes.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ).split("/")[0]
    out = _run(python, "-I", "-c", (
        "import os, sys\n"
        "os.environ.pop('ASCRIBE_IPINTEL_DIR', None)\n"
        "from services.fraud import ipintel\n"
        "holder = ipintel.IpIntelHolder(None)\n"
        "print(holder.folder)\n"
        "print(holder.folder == ipintel.PACKAGED_LISTS)\n"
        f"print(holder.current.lookup({tor_exit!r}).tor is not None)\n"
        "print(sorted(ipintel.list_dates(holder.folder)))\n"
    ), cwd=tmp_path)
    folder, packaged, tor, kinds = out.splitlines()
    assert folder.startswith(str(venv)) and folder.endswith(PACKAGED_IPINTEL), folder
    assert packaged == "True"
    assert tor == "True"
    assert kinds == "[<IpList.DATACENTER: 'datacenter'>, <IpList.TOR: 'tor'>, <IpList.VPN: 'vpn'>]"


def test_the_stubs_import_from_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    python = _venv_with_wheel(wheel, tmp_path, "protobuf", "grpcio")
    venv = tmp_path / "venv"
    # -I: no PYTHONPATH, no current folder; only the venv's site-packages.
    out = _run(python, "-I", "-c", (
        "import ascribe.attribution.v1.attribution_pb2 as pb, ascribe.attribution.v1.attribution_pb2_grpc as g\n"
        "import ascribe.fraud.v1.fraud_pb2_grpc as f\n"
        "print(pb.__file__)\n"
        "print(sorted(pb.DESCRIPTOR.services_by_name))\n"
        "print(hasattr(g, 'TrackingServiceStub'), hasattr(f, 'FraudServiceStub'))\n"
    ), cwd=tmp_path)
    where, services, stubs = out.splitlines()
    assert where.startswith(str(venv)), where
    assert "TrackingService" in services and "CatalogService" in services
    assert stubs == "True True"
