"""Prometheus metrics every service shares, and the /metrics listener.

The gRPC metrics carry the labels go-grpc-prometheus and py-grpc-prometheus
use (``grpc_service``, ``grpc_method``, ``grpc_type``, ``grpc_code``), so
stock gRPC dashboards and alerts work unchanged, and none of them clashes with
the ``service`` or ``job`` label a scrape configuration attaches to targets.

Every service imports this module (the gateway through gateway/metrics.py),
which is where prometheus_client's ``*_created`` series are switched off: they
double the series of every counter and histogram, Prometheus ignores them in
the text format, and ``promtool check metrics`` has nothing to say for them.
"""

from __future__ import annotations

import platform
import tomllib
from importlib import metadata
from pathlib import Path

import grpc
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

_REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- gRPC server

GRPC_SERVER_STARTED_TOTAL = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_SERVER_HANDLED_TOTAL = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its answer (unary and client-streaming RPCs only).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# ---------------------------------------------------------------- gRPC clients

# Outgoing calls (gateway -> attribution, attribution -> fraud, the readiness
# probes' health checks), counted by services.common.grpc_client_metrics on
# every channel open_channel makes; the names and labels of
# go-grpc-prometheus's client metrics.
GRPC_CLIENT_STARTED_TOTAL = Counter(
    "grpc_client_started_total",
    "RPCs started by this process as a client.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_CLIENT_HANDLED_TOTAL = Counter(
    "grpc_client_handled_total",
    "RPCs this process started as a client that completed, whatever their status.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Time from an outgoing RPC's start to its status (for streams: to the stream's end).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

GRPC_CLIENT_BATCH_SIZE = Histogram(
    "ascribe_grpc_client_batch_size",
    "Requests carried by one outgoing batched gRPC call.",
    ["grpc_service", "grpc_method"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)

# ---------------------------------------------------------------- build

BUILD_INFO = Gauge(
    "ascribe_build_info",
    "Always 1; the labels say which build is running (commit 'unknown' outside a git checkout).",
    ["version", "commit", "python"],
)


def grpc_type(handler: grpc.RpcMethodHandler[object, object]) -> str:
    """The method's kind as go-grpc-prometheus names it."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _version() -> str:
    try:
        return metadata.version("ascribe")
    except metadata.PackageNotFoundError:
        pass
    try:
        with (_REPO / "pyproject.toml").open("rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _git_commit(repo: Path = _REPO) -> str:
    """HEAD's commit read from the git files (no subprocess; a worktree's ``.git`` is a file)."""
    try:
        git = repo / ".git"
        if git.is_file():
            git = Path(git.read_text().partition("gitdir:")[2].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.partition("ref:")[2].strip()
        # A worktree keeps its HEAD but shares the refs of the main git directory.
        common = git / "commondir"
        refs_home = (git / common.read_text().strip()).resolve() if common.is_file() else git
        loose = refs_home / ref
        if loose.is_file():
            return loose.read_text().strip()[:12]
        for line in (refs_home / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha[:12]
    except OSError:
        pass
    return "unknown"


BUILD_INFO.labels(_version(), _git_commit(), platform.python_version()).set(1)


def serve_metrics(host: str, port: int) -> None:
    """Serves /metrics from a daemon thread; port 0 disables it (tests)."""
    if port:
        start_http_server(port, addr=host)
