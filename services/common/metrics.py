"""Prometheus metrics every gRPC server shares, and the /metrics listener."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

GRPC_REQUESTS_TOTAL = Counter(
    "ascribe_grpc_server_requests_total",
    "gRPC requests handled, by method and status code.",
    ["service", "method", "code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "ascribe_grpc_server_handling_seconds",
    "Time spent handling a gRPC request.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
GRPC_CLIENT_BATCH_SIZE = Histogram(
    "ascribe_grpc_client_batch_size",
    "Requests carried by one outgoing batched gRPC call.",
    ["target", "method"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


def serve_metrics(host: str, port: int) -> None:
    """Serves /metrics from a daemon thread; port 0 disables it (tests)."""
    if port:
        start_http_server(port, addr=host)
