"""python -m services.attribution: run the attribution service until SIGTERM/SIGINT."""

from __future__ import annotations

from services.attribution.config import Settings
from services.attribution.server import start_attribution
from services.common.runner import run_service


def main() -> None:
    run_service("attribution", Settings.from_env, start_attribution)


if __name__ == "__main__":
    main()
