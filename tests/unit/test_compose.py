"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.stack import Ports

REPO = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "fraud", "attribution", "gateway")
DEFAULTS = Ports.from_env({})
_VAR = re.compile(r"\b(ASCRIBE_[A-Z0-9_]+)\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _variables_read_by_code() -> set[str]:
    names: set[str] = set()
    for folder in ("services", "gateway"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(_VAR.findall(path.read_text()))
    return names


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {key: str(value) for key, value in compose["services"][service].get("environment", {}).items()}


def _port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def _published(compose: dict[str, Any], service: str) -> set[int]:
    """Container ports published to the host, each on the same host port and on loopback."""
    ports = set()
    for spec in compose["services"][service].get("ports", []):
        host_ip, host_port, container_port = str(spec).split(":")
        assert host_ip == "127.0.0.1", f"{service} publishes {spec} beyond loopback"
        assert host_port == container_port, spec
        ports.add(int(container_port))
    return ports


def _health_target(compose: dict[str, Any], service: str) -> str:
    test = compose["services"][service]["healthcheck"]["test"]
    return str(test[-1])


def test_official_images_and_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert str(services["postgres"]["image"]).startswith("postgres:")
    assert str(services["redis"]["image"]).startswith("redis:")
    for name in ("postgres", "redis", *APP_SERVICES[1:]):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["restart"] == "no"
    assert services["attribution"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_variable_is_one_the_services_read(compose: dict[str, Any]) -> None:
    known = _variables_read_by_code()
    for service in APP_SERVICES:
        unknown = {name for name in _env(compose, service) if name.startswith("ASCRIBE_")} - known
        assert not unknown, f"{service} sets variables no service reads: {sorted(unknown)}"


def test_commands_name_existing_modules(compose: dict[str, Any]) -> None:
    for service in APP_SERVICES:
        command = compose["services"][service]["command"]
        assert command[:2] == ["python", "-m"], command
        module = Path(*command[2].split("."))
        assert (REPO / module / "__main__.py").exists() or (REPO / f"{module}.py").exists(), command


def test_ports_match_the_contract(compose: dict[str, Any]) -> None:
    fraud, attribution, gateway = (_env(compose, name) for name in ("fraud", "attribution", "gateway"))
    assert _port_of(fraud["ASCRIBE_FRAUD_ADDR"]) == DEFAULTS.fraud == 50052
    assert int(fraud["ASCRIBE_FRAUD_METRICS_PORT"]) == DEFAULTS.fraud_metrics == 9102
    assert _port_of(attribution["ASCRIBE_ATTRIBUTION_ADDR"]) == DEFAULTS.attribution == 50051
    assert int(attribution["ASCRIBE_ATTRIBUTION_METRICS_PORT"]) == DEFAULTS.attribution_metrics == 9101
    assert int(gateway["ASCRIBE_GATEWAY_PORT"]) == DEFAULTS.gateway == 8080

    assert _published(compose, "fraud") == {DEFAULTS.fraud, DEFAULTS.fraud_metrics}
    assert _published(compose, "attribution") == {DEFAULTS.attribution, DEFAULTS.attribution_metrics}
    assert _published(compose, "gateway") == {DEFAULTS.gateway}

    # Clients name the service by its compose name and its listening port.
    assert attribution["ASCRIBE_FRAUD_ADDR"] == f"fraud:{DEFAULTS.fraud}"
    assert gateway["ASCRIBE_FRAUD_ADDR"] == f"fraud:{DEFAULTS.fraud}"
    assert gateway["ASCRIBE_ATTRIBUTION_ADDR"] == f"attribution:{DEFAULTS.attribution}"
    assert _health_target(compose, "fraud") == f"127.0.0.1:{DEFAULTS.fraud}"
    assert _health_target(compose, "attribution") == f"127.0.0.1:{DEFAULTS.attribution}"
    assert _health_target(compose, "gateway") == f"http://127.0.0.1:{DEFAULTS.gateway}/readyz"


def test_backends_are_reached_by_service_name(compose: dict[str, Any]) -> None:
    assert "@postgres:5432/" in _env(compose, "attribution")["ASCRIBE_DATABASE_URL"]
    assert _env(compose, "migrate")["ASCRIBE_DATABASE_URL"] == _env(compose, "attribution")["ASCRIBE_DATABASE_URL"]
    assert _env(compose, "fraud")["ASCRIBE_REDIS_URL"].startswith("redis://redis:6379/")


def test_listeners_off_loopback_require_tokens(compose: dict[str, Any]) -> None:
    """Inside containers the services bind 0.0.0.0, which the services refuse without tokens."""
    assert ":?" in _env(compose, "attribution")["ASCRIBE_ADMIN_TOKEN"]
    for service in ("fraud", "attribution", "gateway"):
        assert ":?" in _env(compose, service)["ASCRIBE_INTERNAL_TOKEN"], service


def test_dockerfile_is_multi_stage_non_root_and_generates_stubs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2
    assert "RUN make proto" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    for folder in ("services", "gateway", "tools"):
        assert f"COPY {folder} {folder}" in dockerfile


# ---------------------------------------------------------------- Prometheus and Grafana

MONITORING = REPO / "deploy"


def _gateway_metrics_port() -> int:
    """The gateway's metrics port in the contract (tools/stack.py's Ports once it carries it)."""
    return int(getattr(DEFAULTS, "gateway_metrics", 9103))


def _mounts(compose: dict[str, Any], service: str) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for spec in compose["services"][service].get("volumes", []):
        source, target = str(spec).split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), path
    return loaded


def test_prometheus_scrapes_every_service_and_loads_the_rules(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    assert str(service["image"]).startswith("prom/prometheus:v")
    assert _published(compose, "prometheus") == {9090}
    mounts = _mounts(compose, "prometheus")
    config_dir = REPO / mounts["/etc/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    config = _yaml(config_dir / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (config_dir / rule_file).is_file(), rule_file
    assert "alerts.yml" in config["rule_files"]

    targets = {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in config["scrape_configs"]
    }
    fraud, attribution = _env(compose, "fraud"), _env(compose, "attribution")
    assert targets == {
        "fraud": [f"fraud:{fraud['ASCRIBE_FRAUD_METRICS_PORT']}"],
        "attribution": [f"attribution:{attribution['ASCRIBE_ATTRIBUTION_METRICS_PORT']}"],
        "gateway": [f"gateway:{_gateway_metrics_port()}"],
    }
    # Reachable from the Prometheus container, not only on the service's own loopback.
    assert fraud["ASCRIBE_FRAUD_METRICS_HOST"] == attribution["ASCRIBE_ATTRIBUTION_METRICS_HOST"] == "0.0.0.0"
    gateway = _env(compose, "gateway")
    # The gateway's metrics listen where its tracking port does unless told otherwise.
    assert gateway.get("ASCRIBE_GATEWAY_METRICS_HOST", gateway["ASCRIBE_GATEWAY_HOST"]) == "0.0.0.0"
    assert int(gateway.get("ASCRIBE_GATEWAY_METRICS_PORT", _gateway_metrics_port())) == _gateway_metrics_port()
    for job in targets:
        assert job in service["depends_on"], job


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    assert str(service["image"]).startswith("grafana/grafana:")
    assert _published(compose, "grafana") == {3000}
    assert service["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # No default admin password on a published port.
    assert ":?" in _env(compose, "grafana")["GF_SECURITY_ADMIN_PASSWORD"]
    mounts = _mounts(compose, "grafana")
    provisioning = REPO / mounts["/etc/grafana/provisioning"]

    datasources = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [source["url"] for source in datasources] == ["http://prometheus:9090"]
    assert datasources[0]["type"] == "prometheus"

    providers = _yaml(provisioning / "dashboards" / "ascribe.yml")["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    assert dashboard_dir in mounts, f"the dashboard provider reads {dashboard_dir}, which nothing mounts"
    dashboards = sorted((REPO / mounts[dashboard_dir]).glob("*.json"))
    assert [path.name for path in dashboards] == ["ascribe.json"]
    home = _env(compose, "grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboard_dir}/ascribe.json"
    assert (MONITORING / "grafana" / "dashboards" / "ascribe.json").samefile(REPO / mounts[dashboard_dir] / "ascribe.json")
