"""gateway/openapi.json is hand-written: these checks hold it to what the parsers and the renderer do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from gateway import params as gp
from gateway.app import OPENAPI_JSON
from gateway.metrics import ROUTES
from gateway.render import render_conversion
from services.common import limits

SPEC: dict[str, Any] = json.loads(OPENAPI_JSON)
REPO = Path(__file__).resolve().parents[2]


class Recording(dict[str, list[str]]):
    """Params that remember every name a parser asked for."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def resolve(node: Any) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def query_parameters(path: str, method: str) -> dict[str, dict[str, Any]]:
    parameters = [resolve(p) for p in SPEC["paths"][path][method]["parameters"]]
    return {p["name"]: p for p in parameters if p["in"] == "query"}


def walk(node: Any) -> list[str]:
    refs: list[str] = []
    if isinstance(node, dict):
        refs.extend([node["$ref"]] if "$ref" in node else [])
        for value in node.values():
            refs.extend(walk(value))
    elif isinstance(node, list):
        for value in node:
            refs.extend(walk(value))
    return refs


def test_served_file_is_the_repository_file_and_an_openapi_31_document() -> None:
    assert (REPO / "gateway" / "openapi.json").read_bytes() == OPENAPI_JSON
    assert SPEC["openapi"] == "3.1.0" and SPEC["info"]["title"] and SPEC["info"]["version"]
    assert set(SPEC["paths"]) == {"/click", "/postback", "/healthz", "/readyz", "/variant"}
    assert set(SPEC["paths"]) <= ROUTES
    for ref in walk(SPEC):
        assert resolve({"$ref": ref}), ref  # every reference resolves (KeyError otherwise)
    ids = [op["operationId"] for item in SPEC["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in SPEC["paths"].items():
        for operation in item.values():
            for status, response in operation["responses"].items():
                assert response["description"], status
                # /readyz's 503 is its own body (which check failed), not an error.
                if int(status) >= 400 and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, status


def test_click_parameters_are_the_ones_the_parser_reads() -> None:
    recorded = Recording({"campaign_id": ["c"], "aff_id": ["a"]})
    gp.click_request(recorded, ip="203.0.113.1", user_agent="ua", referer="")
    spec = query_parameters("/click", "get")
    assert set(spec) == recorded.asked
    assert {name for name, p in spec.items() if p["required"]} == {"campaign_id", "aff_id"}


def test_variant_parameters_are_the_ones_the_parser_reads() -> None:
    recorded = Recording({"experiment_id": ["e"], "unit_id": ["u"]})
    gp.variant_request(recorded, "token")
    spec = query_parameters("/variant", "get")
    assert set(spec) == recorded.asked
    assert all(p["required"] for p in spec.values())
    for name, parameter in spec.items():
        limit = parameter["schema"]["maxLength"]
        gp.variant_request({"experiment_id": ["e"], "unit_id": ["u"], name: ["x" * limit]}, "token")
        with pytest.raises(gp.ParamError) as raised:
            gp.variant_request({"experiment_id": ["e"], "unit_id": ["u"], name: ["x" * (limit + 1)]}, "token")
        assert raised.value.field == name


def test_postback_parameters_are_the_ones_the_parsers_read() -> None:
    asked: set[str] = set()
    for parse in (gp.conversion_request, gp.reversal_request):
        recorded = Recording({"campaign_id": ["c"], "order_id": ["o"], "amount": ["1.00"]})
        parse(recorded, "token")
        asked |= recorded.asked
    recorded = Recording({})
    gp.postback_event(recorded)
    asked |= recorded.asked
    for method in ("get", "post"):
        assert set(query_parameters("/postback", method)) == asked, method
    body = SPEC["paths"]["/postback"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    assert set(body["schema"]["properties"]) == asked | {"token"}
    # The token is a security scheme, in the header or as `token`, as postback_token reads it.
    schemes = SPEC["components"]["securitySchemes"]
    assert {(s["in"], s["name"]) for s in schemes.values()} == {("header", "X-Ascribe-Token"), ("query", "token")}


BASE = {"campaign_id": ["c"], "aff_id": ["a"], "order_id": ["o"], "amount": ["1.00"]}


def parse_one(path: str, name: str, value: str) -> None:
    values = {**BASE, name: [value]}
    if path == "/click":
        gp.click_request(values, ip="203.0.113.1", user_agent="ua", referer="")
    elif name in ("refund_id", "reason"):
        gp.reversal_request(values, "token")
    else:
        gp.conversion_request(values, "token")


@pytest.mark.parametrize(("path", "method"), [("/click", "get"), ("/postback", "post")])
def test_every_max_length_is_the_parsers_limit(path: str, method: str) -> None:
    """At maxLength a value passes; one character more is a 400 naming the parameter."""
    checked = 0
    for name, parameter in query_parameters(path, method).items():
        schema = parameter["schema"]
        limit = schema.get("maxLength")
        if limit is None or "pattern" in schema or "format" in schema or "anyOf" in schema:
            continue
        parse_one(path, name, "x" * limit)
        with pytest.raises(gp.ParamError) as raised:
            parse_one(path, name, "x" * (limit + 1))
        assert raised.value.field == name
        checked += 1
    assert checked >= 6


def test_patterns_and_enums_match_the_parsers() -> None:
    parameters = SPEC["components"]["parameters"]
    money = re.compile(parameters["amount"]["schema"]["pattern"])
    for sample in ("49.90", "0", "1.123456", "1.1234567", "-1.00", "1e5", ".5", "5.", "1234567890123", "12,50"):
        try:
            gp.parse_money(sample, "amount")
            accepted = True
        except gp.ParamError:
            accepted = False
        assert accepted == bool(money.fullmatch(sample)), sample
    assert parameters["device"]["schema"]["enum"] == sorted(gp._DEVICES, key=["mobile", "desktop", "tablet", "other"].index)
    assert parameters["sku"]["schema"]["maxItems"] == limits.SKUS_PER_ORDER
    assert parameters["sku"]["schema"]["items"]["maxLength"] == limits.SKU
    with pytest.raises(gp.ParamError):
        gp.parse_money("1e5", "amount")
    with pytest.raises(gp.ParamError):
        gp.parse_currency("EURO")


def test_conversion_schema_is_what_the_renderer_writes() -> None:
    schema = SPEC["components"]["schemas"]["Conversion"]
    at = Timestamp(seconds=1_780_000_000)
    full = pb.Conversion(
        id="x", campaign_id="c", order_id="o", status=pb.CONVERSION_STATUS_PENDING, reasons=["r"],
        source=pb.ATTRIBUTION_SOURCE_CLICK, coupon_remaining=3, hold_until=at, received_at=at, occurred_at=at,
        history=[pb.ConversionEvent(to_status=pb.CONVERSION_STATUS_PENDING, at=at, amount_micros=1)],
    )
    assert set(render_conversion(full)) == set(schema["properties"])
    assert set(render_conversion(pb.Conversion())) == set(schema["required"])
    assert set(render_conversion(full)["history"][0]) == set(SPEC["components"]["schemas"]["ConversionEvent"]["properties"])
    words = [v.name.removeprefix("CONVERSION_STATUS_").lower() for v in pb.ConversionStatus.DESCRIPTOR.values]
    assert schema["properties"]["status"]["enum"] == words
    sources = [v.name.removeprefix("ATTRIBUTION_SOURCE_").lower() for v in pb.AttributionSource.DESCRIPTOR.values]
    assert schema["properties"]["source"]["enum"] == sources
