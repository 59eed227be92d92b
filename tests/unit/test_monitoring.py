"""The Grafana dashboard and the alert rules read metrics the services really expose, and hold together.

Structural checks only (no Grafana, no Prometheus): the JSON is a dashboard
Grafana can provision, panels do not overlap, every query names metrics that
a module of ours defines, every alert has a unit test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ascribe.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"

# Metrics that the scrape adds or prometheus_client exposes by itself.
STANDARD = {"up", "process_cpu_seconds"}

_DEFINED = re.compile(r"""["']((?:ascribe|grpc)_[a-z0-9_]+)["']""")
_USED = re.compile(r"\b((?:ascribe|grpc_server|grpc_client|process)_[a-z0-9_]+|up)\b(?!\s*\()")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def defined_metrics() -> set[str]:
    """Every metric name a module of ours declares, without its sample suffixes."""
    names: set[str] = set()
    for folder in ("services", "gateway"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(_base(name) for name in _DEFINED.findall(path.read_text()))
    return names


def used_metrics(expr: str) -> set[str]:
    # Label names and values are not metric names: drop the {...} selectors first.
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    return {_base(name) for name in _USED.findall(bare)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_dashboard_is_provisionable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns it
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_the_dashboard_has_both_views(dashboard: dict[str, Any]) -> None:
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert any(title.startswith("SRE") for title in rows) and "Business" in rows
    queries = " ".join(expr for _, expr in _exprs(dashboard))
    for needed in (
        "ascribe_gateway_requests_total",  # RED per route
        "ascribe_gateway_request_duration_seconds_bucket",
        "grpc_server_handled_total",  # RED per RPC
        "grpc_server_handling_seconds_bucket",
        "ascribe_db_pool_waiting_acquires",  # saturation
        "ascribe_fraud_verdicts_total",  # fraud decisions
        "ascribe_clicks_total",  # business
        "ascribe_conversions_total",
        "ascribe_conversion_revenue_total",
        "ascribe_conversion_payout_total",
    ):
        assert needed in queries, needed


def test_every_query_reads_a_metric_we_expose(dashboard: dict[str, Any]) -> None:
    known = defined_metrics() | STANDARD
    for title, expr in _exprs(dashboard):
        used = used_metrics(expr)
        assert used, (title, expr)
        assert used <= known, (title, sorted(used - known))
    for rule in _alert_rules():
        used = used_metrics(rule["expr"])
        assert used <= known, (rule["alert"], sorted(used - known))


def test_the_name_check_catches_a_typo() -> None:
    known = defined_metrics()
    assert used_metrics('sum by (route) (rate(ascribe_gateway_requests_total{route="/click"}[5m]))') <= known
    assert not used_metrics("rate(ascribe_gateway_request_total[5m])") <= known


def test_every_alert_has_a_unit_test_and_a_severity() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    # Each must be seen firing, not only quiet.
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) == tested == fired
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
