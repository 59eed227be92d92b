"""``ascribe``: the admin command line over the attribution service's gRPC API.

Installed into the venv by ``make install`` (an editable install, so the
command runs this checkout's code). The services find the generated stubs
through make's PYTHONPATH; the command is run from a plain shell, so it puts
the checkout's ``gen/`` on the path itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

_GEN = Path(__file__).resolve().parent.parent / "gen"
if _GEN.is_dir() and str(_GEN) not in sys.path:
    sys.path.append(str(_GEN))


def main() -> None:
    """The console script's entry point."""
    try:
        from ascribe_cli.app import app
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "ascribe":
            sys.exit(f"ascribe: the generated gRPC stubs are missing ({error.name}): run `make proto`")
        raise
    app(prog_name="ascribe")
