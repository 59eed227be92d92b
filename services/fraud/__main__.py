"""python -m services.fraud: run the fraud service until SIGTERM/SIGINT (SIGHUP reloads the IP lists)."""

from __future__ import annotations

from services.common.runner import run_service
from services.fraud.config import Settings
from services.fraud.server import start_fraud


def main() -> None:
    run_service("fraud", Settings.from_env, start_fraud)


if __name__ == "__main__":
    main()
