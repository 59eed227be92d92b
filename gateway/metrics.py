"""The gateway's Prometheus metrics, served on their own port at /metrics.

Labels stay low-cardinality: the route is one of the fixed paths (``other``
for anything else, ``/metrics`` on the tracking port included) and the status
an HTTP code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from ascribe.attribution.v1 import attribution_pb2 as pb
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from services.common.metrics import GRPC_CLIENT_BATCH_SIZE

logger = logging.getLogger(__name__)

# As the attribution server's grpc_service label names it.
TRACKING_SERVICE = pb.DESCRIPTOR.services_by_name["TrackingService"].full_name

ROUTES = frozenset({"/click", "/postback", "/healthz", "/readyz", "/openapi.json", "/variant"})

HTTP_REQUESTS_TOTAL = Counter(
    "ascribe_gateway_requests_total",
    "HTTP requests answered, by route and status code.",
    ["route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "ascribe_gateway_request_duration_seconds",
    "Time from a request's arrival at the handler to its answer.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CLICKS_TOTAL = Counter(
    "ascribe_gateway_clicks_total",
    "Clicks redirected, by the attribution service's decision.",
    ["decision"],
)
CONVERSIONS_TOTAL = Counter(
    "ascribe_gateway_conversions_total",
    "Postbacks answered with a conversion, by event and resulting status.",
    ["event", "status"],
)
UPSTREAM_ERRORS_TOTAL = Counter(
    "ascribe_gateway_upstream_errors_total",
    "Attribution calls (or entries of a batch) that failed, by RPC and gRPC status code.",
    # The grpc_* names of the server side, so one query joins both ends.
    ["grpc_method", "grpc_code"],
)
BACKEND_UP = Gauge(
    "ascribe_gateway_backend_up",
    "1 when the backend answered SERVING to the last readiness probe.",
    ["backend"],
)
# Admission control (gateway/admission.py): what was answered "busy" instead of waiting.
SHED_TOTAL = Counter(
    "ascribe_gateway_shed_total",
    "Requests and connections answered 503 (408 for slow_head) by admission control, by reason "
    "(queue, event_loop, connections, slow_head).",
    ["reason"],
)

CLICK_BATCH_SIZE = GRPC_CLIENT_BATCH_SIZE.labels(TRACKING_SERVICE, "RecordClickBatch")
CONVERSION_BATCH_SIZE = GRPC_CLIENT_BATCH_SIZE.labels(TRACKING_SERVICE, "RecordConversionBatch")


class RequestMetrics:
    """Pre-bound label children: ``labels()`` on every request costs a lock and a dict build."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], Counter] = {}
        self._histograms = {route: HTTP_REQUEST_SECONDS.labels(route) for route in (*ROUTES, "other")}

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        key = (route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = HTTP_REQUESTS_TOTAL.labels(route, str(status))
        counter.inc()
        self._histograms[route].observe(seconds)


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_listener(host: str, port: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that serves /metrics on ``host:port`` for as long as the tracking app runs.

    A second aiohttp site on the same event loop, not prometheus_client's
    thread: it starts and stops with the gateway (run_app's shutdown closes
    it), and a port already in use fails the start-up instead of a thread.
    """

    async def listener(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", metrics_page)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            logger.info("gateway metrics on http://%s:%d/metrics", host, runner.addresses[0][1])
            yield
        finally:
            await runner.cleanup()

    return listener
