"""Container health probe: `python -m tools.healthcheck grpc HOST:PORT` or `... http URL`.

Exits 0 when the gRPC server reports SERVING (grpc.health.v1) or the URL
answers 200, 1 otherwise: the images carry no grpc_health_probe or curl.
"""

from __future__ import annotations

import sys

from tools.stack import grpc_serving, http_ok


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print("usage: python -m tools.healthcheck grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    kind, target = argv
    healthy = grpc_serving(target, timeout=2.0) if kind == "grpc" else http_ok(target, timeout=2.0)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
