"""`pip install .` (a wheel) carries the generated gRPC and protobuf stubs.

The checkout keeps them out of git (make's gen/, on PYTHONPATH); a wheel has
no such folder, so building one runs grpc_tools.protoc over protos/ into the
build tree, beside the services: ``ascribe.attribution.v1``,
``ascribe.fraud.v1`` and ``ascribe.options.v1`` (namespace packages, as in
gen/). An editable install (``make install``) skips it: it reads gen/.
Everything else is declared in pyproject.toml; grpcio-tools comes from its
build-system requirements, at requirements-dev.txt's pin.

The IP lists' snapshot (data/ipintel, with its README, sources and
licences) goes into the wheel beside the fraud service's loader, as
``services/fraud/ipintel_snapshot`` (services.fraud.ipintel.PACKAGED_LISTS):
a wheel-installed fraud service has its Tor, VPN and datacenter signals on
without ASCRIBE_IPINTEL_DIR (issue #16). The checkout keeps one copy, at
data/ipintel, where the Dockerfile and the tests read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
IPINTEL = ROOT / "data" / "ipintel"
# Where services/fraud/ipintel.py looks when it is not in a checkout.
PACKAGED_IPINTEL = Path("services") / "fraud" / "ipintel_snapshot"


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            generate_stubs(Path(self.build_lib))
            copy_ipintel(Path(self.build_lib))


def copy_ipintel(out: Path) -> None:
    if not (IPINTEL / "SOURCES.tsv").is_file():
        raise SystemExit(f"no IP list snapshot at {IPINTEL}: the wheel would have the fraud signals off")
    shutil.copytree(IPINTEL, out / PACKAGED_IPINTEL, dirs_exist_ok=True)


def generate_stubs(out: Path) -> None:
    import importlib.resources

    from grpc_tools import protoc

    # google/protobuf/*.proto, which `python -m grpc_tools.protoc` adds itself.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {PROTOS}")
    out.mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", *files,
    ])
    if status != 0:
        raise SystemExit(f"grpc_tools.protoc failed ({status}) generating the stubs")


setup(cmdclass={"build_py": BuildPyWithStubs})
