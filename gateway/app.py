"""The gateway's HTTP routes: tracking links, postbacks and health (/metrics has its own port).

HTTP only: parse and validate (gateway.params), call the attribution service
(gateway.client), answer 302 or JSON. Every failure becomes a JSON error;
nothing answers 500 or shows a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import grpc
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from ascribe.attribution.v1 import attribution_pb2 as pb

from gateway import admission, protocol_errors
from gateway.client import AttributionClient, BackendError, open_channel
from gateway.client_ip import ClientIpResolver
from gateway.config import Settings
from gateway.metrics import BACKEND_UP, CLICKS_TOTAL, CONVERSIONS_TOTAL, ROUTES, RequestMetrics
from gateway.params import (
    ParamError,
    Params,
    click_request,
    conversion_request,
    parse_body,
    parse_urlencoded,
    postback_event,
    postback_token,
    reversal_request,
    variant_request,
)
from gateway.render import ARM_WORDS, DECISION_WORDS, STATUS_WORDS, render_conversion
from services.common.batcher import QueueTimeout

logger = logging.getLogger(__name__)

# Postbacks are a few hundred bytes; nothing legitimate needs more.
MAX_BODY_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
}

_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# What ``web.json_response`` would send, built once.
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}

# The OpenAPI 3.1 description of these routes, written by hand beside them and
# checked against the parsers by tests/unit/test_gateway_openapi.py.
OPENAPI_JSON = (Path(__file__).resolve().parent / "openapi.json").read_bytes()


def json_body_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers=JSON_HEADERS)


def json_response(data: Any, status: int = 200) -> web.Response:
    return json_body_response(orjson.dumps(data), status)


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message, "field": field}}, status)


def http_error_response(error: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404, 405, 413, ...) as our JSON."""
    code = _HTTP_ERROR_CODES.get(error.status, "bad_request" if error.status < 500 else "unavailable")
    status = error.status if error.status < 500 else 503
    return error_response(status, code, error.reason)


def unavailable_response(message: str = "the attribution service is unavailable; try again") -> web.Response:
    return error_response(503, "unavailable", message)


def param_error_response(error: ParamError) -> web.Response:
    response = error_response(error.status, error.code, error.message, error.field)
    if error.status == 408:
        response.force_close()  # the rest of the body may still be on its way
    return response


# The attribution service names proto fields; the caller knows HTTP parameters.
CLICK_FIELDS = {
    "affiliate_id": "aff_id",
    "coupon_code": "coupon",
    "external_click_id": "aff_click_id",
}
CONVERSION_FIELDS = {
    "coupon_code": "coupon",
    "amount_micros": "amount",
    "discount_micros": "discount",
    "user_agent": "ua",
    "device_type": "device",
    "skus": "sku",
    "postback_token": "token",
}
REVERSAL_FIELDS = {"amount_micros": "amount", "postback_token": "token"}
VARIANT_FIELDS = {"postback_token": "token"}


def http_field(field: str | None, names: dict[str, str]) -> str | None:
    if not field:
        return None
    base = field.split("[", 1)[0].split(".", 1)[0]
    return names.get(base, base)


def backend_response(error: BackendError, names: dict[str, str], *, visitor: bool = False) -> web.Response:
    """The HTTP answer for a failed attribution call.

    ``visitor`` marks a browser following a tracking link: it cannot be at
    fault for an authentication failure, so that is a 503 there.
    """
    mapped = _STATUS_BY_CODE.get(error.code)
    if mapped is None:
        if error.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            logger.warning("attribution call failed with %s", error.code.name)
        return unavailable_response()
    status, code = mapped
    if status == 401 and (visitor or error.token_refused):
        logger.error("the attribution service refused ASCRIBE_INTERNAL_TOKEN; check the gateway's setting")
        return unavailable_response()
    return error_response(status, code, error.message, http_field(error.field, names))


class Gateway:
    """The route handlers, with what they share: the client and precomputed pieces."""

    def __init__(self, settings: Settings, client: AttributionClient | None = None) -> None:
        self.settings = settings
        self.client = client
        self._ips = ClientIpResolver(settings.trusted_proxies)
        self._debug_headers = settings.debug_headers
        self._clicks_by_decision = {
            number: CLICKS_TOTAL.labels(word) for number, word in DECISION_WORDS.words.items()
        }
        self._conversions_by_status = {
            (event, number): CONVERSIONS_TOTAL.labels(event, word)
            for event in ("conversion", "refund")
            for number, word in STATUS_WORDS.words.items()
        }
        self.metrics = RequestMetrics()

    def _client(self) -> AttributionClient:
        if self.client is None:
            raise RuntimeError("the gateway's attribution client is not started")
        return self.client

    # ------------------------------------------------------------ tracking links

    async def click(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        try:
            params = parse_urlencoded(request.rel_url.raw_query_string)
            ip = self._ips.resolve(request.remote, headers.getall("X-Forwarded-For", ()))
            rpc_request = click_request(
                params,
                ip=ip,
                user_agent=headers.get("User-Agent", ""),
                referer=headers.get("Referer", ""),
            )
        except ParamError as error:
            return param_error_response(error)
        try:
            answer = await self._client().record_click(rpc_request)
        except BackendError as error:
            return backend_response(error, CLICK_FIELDS, visitor=True)
        url = answer.redirect_url
        # The target is the campaign's registered URL; anything else would make
        # us an open redirect (or inject headers), so it is never followed.
        if not url.startswith(("https://", "http://")) or "\r" in url or "\n" in url:
            logger.error("attribution service answered a click without a usable redirect_url")
            return unavailable_response("no landing URL to redirect to")
        decision = answer.decision
        out = {
            "Location": url,
            "X-Ascribe-Click-Id": answer.click_id,
            # Each visit must reach us to be counted: no browser or proxy caching.
            "Cache-Control": "no-store",
        }
        if self._debug_headers:
            out["X-Ascribe-Decision"] = DECISION_WORDS.shown(decision)
        counter = self._clicks_by_decision.get(decision)
        if counter is not None:
            counter.inc()
        return web.Response(status=302, headers=out)

    # ------------------------------------------------------------ postbacks

    async def postback(self, request: web.Request) -> web.StreamResponse:
        try:
            params = parse_urlencoded(request.rel_url.raw_query_string)
            if request.method == "POST" and request.body_exists:
                await self._read_form(request, params)
            event = postback_event(params)
            if event == "refund" and request.method != "POST":
                return error_response(405, "method_not_allowed", "refunds must be POSTed", "event")
            token = postback_token(request.headers.get("X-Ascribe-Token"), params)
            if event == "refund":
                return await self._refund(reversal_request(params, token))
            return await self._conversion(conversion_request(params, token))
        except ParamError as error:
            return param_error_response(error)

    async def _read_form(self, request: web.Request, params: Params) -> None:
        content_type = request.content_type
        if content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise ParamError(
                None,
                "send parameters in the query or as application/x-www-form-urlencoded",
                code="unsupported_media_type",
                status=415,
            )
        try:
            async with asyncio.timeout(self.settings.body_timeout_ms / 1000):
                if content_type == "application/x-www-form-urlencoded":
                    parse_body(await request.read(), params)
                    return
                form = await request.post()
        except TimeoutError:
            raise ParamError(
                None, "the request body did not arrive in time", code="request_timeout", status=408
            ) from None
        except (ValueError, LookupError, RuntimeError, HttpProcessingError) as error:
            # aiohttp's multipart reader: no boundary or field name (ValueError), an
            # unknown charset (LookupError) or transfer encoding (RuntimeError),
            # broken part headers (BadHttpMessage): the caller's body, not our fault.
            raise ParamError(None, "malformed multipart/form-data body", code="malformed_body") from error
        for name, value in form.items():
            if not isinstance(value, str):
                raise ParamError(name, f"{name} must be a plain form field, not a file")
            params.setdefault(name, []).append(value)

    async def _conversion(self, rpc_request: pb.RecordConversionRequest) -> web.Response:
        try:
            conversion = await self._client().record_conversion(rpc_request)
        except BackendError as error:
            return backend_response(error, CONVERSION_FIELDS)
        return self._conversion_response("conversion", conversion)

    async def _refund(self, rpc_request: pb.ReverseConversionRequest) -> web.Response:
        try:
            conversion = await self._client().reverse_conversion(rpc_request)
        except BackendError as error:
            return backend_response(error, REVERSAL_FIELDS)
        return self._conversion_response("refund", conversion)

    def _conversion_response(self, event: str, conversion: pb.Conversion) -> web.Response:
        body = render_conversion(conversion)
        counter = self._conversions_by_status.get((event, conversion.status))
        if counter is None:
            counter = CONVERSIONS_TOTAL.labels(event, body["status"])
        counter.inc()
        return json_response(body)

    # ------------------------------------------------------------ experiments (issue #17)

    async def variant(self, request: web.Request) -> web.StreamResponse:
        """The unit's arm and, for treatment, the code to show; the exposure is recorded once."""
        try:
            params = parse_urlencoded(request.rel_url.raw_query_string)
            token = postback_token(request.headers.get("X-Ascribe-Token"), params)
            rpc_request = variant_request(params, token)
        except ParamError as error:
            return param_error_response(error)
        try:
            answer = await self._client().assign_variant(rpc_request)
        except BackendError as error:
            return backend_response(error, VARIANT_FIELDS)
        body: dict[str, Any] = {
            "experiment_id": answer.experiment_id,
            "unit_id": answer.unit_id,
            "arm": ARM_WORDS.shown(answer.arm),
        }
        if answer.coupon_code:
            body["coupon"] = answer.coupon_code
        return json_response(body)

    # ------------------------------------------------------------ operations

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        """Ready when the attribution service serves; fraud is fail-open, so only a detail."""
        client = self._client()
        attribution, fraud = await asyncio.gather(client.attribution_serving(), client.fraud_serving())
        BACKEND_UP.labels("attribution").set(1 if attribution else 0)
        if fraud is not None:
            BACKEND_UP.labels("fraud").set(1 if fraud else 0)
        checks = {
            "attribution": "serving" if attribution else "unavailable",
            "fraud": "not_configured" if fraud is None else ("serving" if fraud else "unavailable"),
        }
        body: dict[str, object] = {"status": "ready" if attribution else "not_ready", "checks": checks}
        if fraud is False:
            # Fail-open: clicks and conversions still flow, recorded FLAGGED and re-scored later.
            body["detail"] = "fraud degraded"
        return json_response(body, status=200 if attribution else 503)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return json_body_response(OPENAPI_JSON)

    async def unmatched(self, request: web.Request) -> web.StreamResponse:
        """Every path and method no route takes (a catch-all route, so no middleware is needed)."""
        if request.path in ROUTES:
            raise web.HTTPMethodNotAllowed(request.method, ())
        raise web.HTTPNotFound()

    # ------------------------------------------------------------ every request

    def guarded(self, handler: Handler, route: str | None) -> Handler:
        """``handler`` with JSON for aiohttp's own errors and anything unexpected, and metrics.

        Per route rather than a middleware: aiohttp's middleware chain costs
        several µs on every click. ``route`` None takes it from the path.
        """
        observe = self.metrics.observe

        async def guard(request: web.Request) -> web.StreamResponse:
            started = perf_counter()
            try:
                response = await handler(request)
            except web.HTTPException as error:
                if error.status < 400:
                    raise
                response = http_error_response(error)
            except QueueTimeout:
                response = admission.busy_response()  # over the time budget: 503, Retry-After
            except asyncio.CancelledError:
                raise
            except Exception:
                # The path only: the query may carry a postback token.
                logger.exception("unexpected error handling %s %s", request.method, request.path)
                response = unavailable_response("the gateway could not handle this request; try again")
            observe(route or request.path, response.status, perf_counter() - started)
            return response

        return guard


def create_app(settings: Settings, client: AttributionClient | None = None) -> web.Application:
    """The aiohttp application; without ``client`` it opens its own channels at start-up."""
    gateway = Gateway(settings, client)
    protocol_errors.install()
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    guarded = gateway.guarded
    app.router.add_get("/click", guarded(gateway.click, "/click"), allow_head=False)
    postback = guarded(gateway.postback, "/postback")
    app.router.add_route("GET", "/postback", postback)
    app.router.add_route("POST", "/postback", postback)
    app.router.add_get("/healthz", guarded(gateway.healthz, "/healthz"))
    app.router.add_get("/readyz", guarded(gateway.readyz, "/readyz"))
    app.router.add_get("/openapi.json", guarded(gateway.openapi, "/openapi.json"))
    app.router.add_get("/variant", guarded(gateway.variant, "/variant"), allow_head=False)
    # Last: the router tries a path's own resource first, so this only takes
    # what no route above does (404, or 405 on a known path). /metrics is one
    # of those 404s: it lives on ASCRIBE_GATEWAY_METRICS_PORT (gateway.metrics).
    app.router.add_route("*", "/{path:.*}", guarded(gateway.unmatched, None))
    if client is None:
        app.cleanup_ctx.append(_backend_ctx(gateway))
    return app


def _backend_ctx(gateway: Gateway) -> Callable[[web.Application], AsyncIterator[None]]:
    async def backend(app: web.Application) -> AsyncIterator[None]:
        settings = gateway.settings
        channel = open_channel(settings.attribution_addr, settings.transport)
        fraud_channel = open_channel(settings.fraud_addr, settings.transport)
        gateway.client = AttributionClient(settings, channel, fraud_channel)
        try:
            yield
        finally:
            # run_app has already drained in-flight requests; close what is still queued.
            await gateway.client.close()
            gateway.client = None
            await channel.close()
            await fraud_channel.close()

    return backend
