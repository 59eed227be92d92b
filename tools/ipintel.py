"""make ipintel: download the fraud service's IP lists (into .data/ipintel by default).

Without ASCRIBE_IPINTEL_DIR the fraud service loads this copy instead of the
repository's snapshot (data/ipintel) as soon as it holds every list and is
newer; send the running service SIGHUP to load it now. Sources, checks and
SOURCES.tsv: services/fraud/ipintel_download.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.fraud.ipintel_download import SOURCES, refresh


def default_folder() -> Path:
    """$ASCRIBE_IPINTEL_DIR, else $ASCRIBE_DATA_DIR/ipintel (.data/ipintel): where the service looks."""
    configured = os.environ.get("ASCRIBE_IPINTEL_DIR", "").strip()
    if configured:
        return Path(configured)
    return Path(os.environ.get("ASCRIBE_DATA_DIR", "").strip() or ".data") / "ipintel"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dir", type=Path, default=default_folder(),
        help="where to write the lists (default: $ASCRIBE_IPINTEL_DIR, else $ASCRIBE_DATA_DIR/ipintel)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per download")
    args = parser.parse_args(argv)
    folder: Path = args.dir
    report = refresh(folder, SOURCES, args.timeout)
    for name, count, url in report.written:
        print(f"ipintel: {name}: {count} entries from {url}")
    for name, error in report.failed:
        print(f"ipintel: {name}: FAILED ({error}); the previous copy, if any, is kept", file=sys.stderr)
    if report.failed:
        print(f"ipintel: {len(report.failed)} of {len(SOURCES)} lists failed", file=sys.stderr)
        return 1
    print(f"ipintel: lists are in {folder}; send the fraud service SIGHUP to reload them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
