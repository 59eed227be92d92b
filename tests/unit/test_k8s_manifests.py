"""deploy/k8s agrees with the code and with Kubernetes' schemas (no cluster needed).

Every environment variable a container sets is one its service reads (through
the services/common/env.py helpers or os.environ); every probe and Service
port is a port the container declares and the service listens on by its
setting; gRPC probes ask the plaintext health port for health names the
servers really serve; every Secret a pod reads is in secrets.yaml with that
key; each stateless Deployment has a Service, a PodDisruptionBudget and an
HPA; and each object validates against the Kubernetes API schema (strict:
an unknown field fails).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from ascribe.attribution.v1 import attribution_pb2
from ascribe.fraud.v1 import fraud_pb2

from services.attribution import server as attribution_server

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes the manifests are written for: gRPC probes are GA in
# 1.27, the preStop sleep action is on by default from 1.30.
KUBERNETES_VERSION = "1.30.0"
SERVICES = ("gateway", "attribution", "fraud")
# Where each container's settings are read: its own package and the shared modules.
CODE = {
    "gateway": ("gateway", "services/common"),
    "attribution": ("services/attribution", "services/common"),
    "fraud": ("services/fraud", "services/common"),
    "migrate": ("services/attribution", "services/common"),
}
# The settings that name a listening address or port, per service: (variable, is a host:port).
LISTENERS = {
    "gateway": {"ASCRIBE_GATEWAY_PORT": False, "ASCRIBE_GATEWAY_METRICS_PORT": False},
    "attribution": {
        "ASCRIBE_ATTRIBUTION_ADDR": True,
        "ASCRIBE_ATTRIBUTION_HEALTH_ADDR": True,
        "ASCRIBE_ATTRIBUTION_METRICS_PORT": False,
    },
    "fraud": {"ASCRIBE_FRAUD_ADDR": True, "ASCRIBE_FRAUD_HEALTH_ADDR": True, "ASCRIBE_FRAUD_METRICS_PORT": False},
}
HOST_OF = {
    "ASCRIBE_GATEWAY_PORT": "ASCRIBE_GATEWAY_HOST",
    "ASCRIBE_GATEWAY_METRICS_PORT": "ASCRIBE_GATEWAY_METRICS_HOST",
    "ASCRIBE_ATTRIBUTION_METRICS_PORT": "ASCRIBE_ATTRIBUTION_METRICS_HOST",
    "ASCRIBE_FRAUD_METRICS_PORT": "ASCRIBE_FRAUD_METRICS_HOST",
}
# The API services each gRPC server registers (and marks SERVING while ready).
API_SERVICES = {
    "attribution": {
        attribution_server.CATALOG_SERVICE,
        attribution_server.TRACKING_SERVICE,
        attribution_server.REPORT_SERVICE,
    },
    "fraud": {service.full_name for service in fraud_pb2.DESCRIPTOR.services_by_name.values()},
}
_READERS = {"env_str", "env_int", "env_float", "env_bool", "env_optional", "health_addr_from_env", "_path"}
_NAME = re.compile(r"^ASCRIBE_[A-Z0-9_]+$")


# ---------------------------------------------------------------- loading


def _documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, document in _documents():
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{key} declared twice ({path.name})"
        found[key] = document
    return found


def _deployment(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    return objects[("Deployment", name)]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(workload)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _values(container: dict[str, Any]) -> dict[str, str]:
    return {name: str(item["value"]) for name, item in _env(container).items() if "value" in item}


def _port_of(value: str, is_addr: bool) -> int:
    return int(value.rpartition(":")[2]) if is_addr else int(value)


def _host_of(values: dict[str, str], variable: str, is_addr: bool) -> str:
    if is_addr:
        return values[variable].rpartition(":")[0].strip("[]")
    return values.get(HOST_OF[variable], "")


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    """The container port a probe hits (a number, or the name of a declared port)."""
    action = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
    assert action is not None, probe
    port = action["port"]
    declared = {item["name"]: item["containerPort"] for item in container["ports"]}
    if isinstance(port, str):
        assert port in declared, f"probe names the undeclared port {port!r}"
        return int(declared[port])
    assert port in declared.values(), f"probe hits port {port}, which the container does not declare"
    return int(port)


# ---------------------------------------------------------------- what the code reads


def _read_names(tree: ast.AST) -> set[str]:
    """ASCRIBE_* names a module reads: helper(name, ...), os.environ[name], os.environ.get, os.getenv.

    A comprehension over literal names passed to a helper (``_path(name) for
    name in ("ASCRIBE_TLS_CERT", ...)``) counts each of them.
    """

    def called(node: ast.Call) -> str:
        func = node.func
        if isinstance(func, ast.Name):
            return func.id
        if isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            if (owner, func.attr) in {("os.environ", "get"), ("os", "getenv"), ("environ", "get")}:
                return "os.environ.get"
        return ""

    def literal(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _NAME.match(node.value):
            return node.value
        return None

    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and called(node) in {*_READERS, "os.environ.get"}:
            if (name := literal(node.args[0])) is not None:
                names.add(name)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in {"os.environ", "environ"}:
            if (name := literal(node.slice)) is not None:
                names.add(name)
        elif isinstance(node, ast.GeneratorExp | ast.ListComp | ast.SetComp):
            element = node.elt
            for generator in node.generators:
                if (
                    isinstance(element, ast.Call)
                    and called(element) in _READERS
                    and isinstance(generator.target, ast.Name)
                    and any(isinstance(arg, ast.Name) and arg.id == generator.target.id for arg in element.args)
                    and isinstance(generator.iter, ast.Tuple | ast.List)
                ):
                    names.update(n for item in generator.iter.elts if (n := literal(item)) is not None)
    return names


def names_read_by(service: str) -> set[str]:
    names: set[str] = set()
    for folder in CODE[service]:
        for path in (REPO / folder).rglob("*.py"):
            names |= _read_names(ast.parse(path.read_text(), str(path)))
    return names


def test_the_reader_scan_finds_known_settings() -> None:
    """The scan itself: each way of reading a setting is recognised."""
    assert {"ASCRIBE_GATEWAY_PORT", "ASCRIBE_INTERNAL_TOKEN", "ASCRIBE_LOG_FORMAT"} <= names_read_by("gateway")
    assert {"ASCRIBE_TLS_CERT", "ASCRIBE_TLS_KEY", "ASCRIBE_TLS_CA"} <= names_read_by("fraud")  # the comprehension
    assert {"ASCRIBE_DATABASE_URL", "ASCRIBE_ATTRIBUTION_HEALTH_ADDR"} <= names_read_by("attribution")
    assert "ASCRIBE_DATABASE_URL" not in names_read_by("gateway")


def _liveness_service() -> str | None:
    """The health name that follows only the process (services/common/readiness.py), when present."""
    path = REPO / "services" / "common" / "readiness.py"
    if not path.exists():
        return None
    match = re.search(r'^LIVENESS_SERVICE = "([^"]+)"', path.read_text(), re.MULTILINE)
    assert match, f"{path} has no LIVENESS_SERVICE"
    return match.group(1)


# ---------------------------------------------------------------- tests


def test_every_object_validates_against_the_kubernetes_schema() -> None:
    count = 0
    for path, document in _documents():
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: {error.message}")
        count += 1
    assert count >= 14


def test_kustomization_applies_everything_but_the_secret_placeholders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"secrets.yaml"}, "an apply must never overwrite real Secrets with placeholders"
    assert kustomization["namespace"] == "ascribe"
    assert [image["name"] for image in kustomization["images"]] == ["ascribe"]


def test_each_stateless_service_has_a_deployment_service_pdb_and_hpa(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name in SERVICES:
        deployment = _deployment(objects, name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = objects[("Service", name)]
        assert service["spec"]["selector"].items() <= labels.items(), name
        pdb = objects[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        hpa = objects[("HorizontalPodAutoscaler", name)]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # A drain may take a pod only while another serves.
        assert hpa["spec"]["minReplicas"] >= 2 and deployment["spec"]["replicas"] >= 2, name
        assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name


def test_pods_restart_run_unprivileged_and_have_resources(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    workloads = [_deployment(objects, name) for name in SERVICES] + [objects[("Job", "migrate")]]
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = _pod(workload)
        expected = "OnFailure" if workload["kind"] == "Job" else "Always"
        assert pod["restartPolicy"] == expected, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid, f"{name} runs as another user than the image's"
        container = _container(workload)
        assert container["image"] == "ascribe", name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][kind].keys(), f"{name} {kind}"
    migrate = objects[("Job", "migrate")]
    assert _container(migrate)["command"] == ["python", "-m", "services.attribution.migrate"]


def test_commands_name_existing_modules(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    workloads = [_deployment(objects, name) for name in SERVICES] + [objects[("Job", "migrate")]]
    for workload in workloads:
        command = _container(workload)["command"]
        assert command[:2] == ["python", "-m"], command
        module = Path(*command[2].split("."))
        assert (REPO / module / "__main__.py").exists() or (REPO / f"{module}.py").exists(), command


def test_every_env_name_is_a_setting_the_service_reads(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    workloads = {name: _deployment(objects, name) for name in SERVICES}
    workloads["migrate"] = objects[("Job", "migrate")]
    for name, workload in workloads.items():
        known = names_read_by(name)
        env = _env(_container(workload))
        assert all(variable.startswith("ASCRIBE_") for variable in env), name
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name} sets variables its code never reads: {unknown}"


def test_every_secret_reference_exists(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    secrets = {
        document["metadata"]["name"]: set(document.get("stringData", {})) | set(document.get("data", {}))
        for path, document in _documents()
        if path.name == "secrets.yaml"
    }
    assert all(document["kind"] == "Secret" for path, document in _documents() if path.name == "secrets.yaml")
    workloads = [_deployment(objects, name) for name in SERVICES] + [objects[("Job", "migrate")]]
    for workload in workloads:
        for variable, item in _env(_container(workload)).items():
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["key"] in secrets.get(ref["name"], set()), f"{variable}: {ref}"
        for volume in _pod(workload).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, volume


def test_tokens_come_from_secrets_never_literals(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in SERVICES:
        env = _env(_container(_deployment(objects, name)))
        for variable in ("ASCRIBE_INTERNAL_TOKEN", "ASCRIBE_ADMIN_TOKEN", "ASCRIBE_DATABASE_URL", "ASCRIBE_REDIS_URL"):
            if variable in env:
                assert "secretKeyRef" in env[variable].get("valueFrom", {}), f"{name}: {variable}"
    assert "ASCRIBE_INTERNAL_TOKEN" in _env(_container(_deployment(objects, "gateway")))
    assert "ASCRIBE_ADMIN_TOKEN" in _env(_container(_deployment(objects, "attribution")))


def test_tls_files_are_in_a_mounted_secret(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in SERVICES:
        deployment = _deployment(objects, name)
        container = _container(deployment)
        values = _values(container)
        assert "ASCRIBE_TLS_CA" in values, f"{name}: gRPC hops go over TLS in the cluster"
        secret_volumes = {v["name"]: v["secret"]["secretName"] for v in _pod(deployment)["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if m["name"] in secret_volumes}
        for variable in ("ASCRIBE_TLS_CA", "ASCRIBE_TLS_CERT", "ASCRIBE_TLS_KEY"):
            folder, _, key = values[variable].rpartition("/")
            assert folder in mounts, f"{name}: {variable} is not in a mounted Secret"
            assert key in {"ca.crt", "tls.crt", "tls.key"}, f"{name}: {variable}"
            # No subPath: a renewed certificate must reach the running pod.
            assert all("subPath" not in m for m in container["volumeMounts"]), name


def test_ports_are_the_ones_the_services_listen_on(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Every declared container port is bound by a setting, off loopback (the kubelet probes the pod's IP)."""
    for name in SERVICES:
        container = _container(_deployment(objects, name))
        values = _values(container)
        listening = {
            _port_of(values[variable], is_addr)
            for variable, is_addr in LISTENERS[name].items()
            if variable in values
        }
        for variable, is_addr in LISTENERS[name].items():
            if variable in values:
                assert _host_of(values, variable, is_addr) in {"0.0.0.0", "::"}, f"{name}: {variable} binds loopback"
        declared = {item["containerPort"] for item in container["ports"]}
        assert declared == listening, f"{name}: declared {sorted(declared)}, listens on {sorted(listening)}"
        service = objects[("Service", name)]
        names = {item["name"]: item["containerPort"] for item in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (names.get(target) if isinstance(target, str) else target) in declared, f"{name}: {port}"


def test_clients_dial_the_services_by_name_and_port(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in ("gateway", "attribution"):
        values = _values(_container(_deployment(objects, name)))
        for variable, target in (("ASCRIBE_ATTRIBUTION_ADDR", "attribution"), ("ASCRIBE_FRAUD_ADDR", "fraud")):
            if name == target:
                continue
            host, _, port = values[variable].rpartition(":")
            assert host == target, f"{name}: {variable}"
            service_ports = {item["port"] for item in objects[("Service", target)]["spec"]["ports"]}
            assert int(port) in service_ports, f"{name}: {variable} -> {service_ports}"
            server = _values(_container(_deployment(objects, target)))[variable]
            assert int(port) == _port_of(server, True), f"{name}: {variable} is not the port {target} listens on"


def test_grpc_probes_ask_the_plaintext_health_port(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The kubelet's gRPC probe speaks no TLS: under TLS it must hit ASCRIBE_*_HEALTH_ADDR's port."""
    for name in ("attribution", "fraud"):
        container = _container(_deployment(objects, name))
        values = _values(container)
        health_port = _port_of(values[f"ASCRIBE_{name.upper()}_HEALTH_ADDR"], True)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]
            assert "grpc" in probe, f"{name} {kind}"
            assert _probe_port(container, probe) == health_port, f"{name} {kind}"


def test_readiness_asks_an_api_service_the_server_registers(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert attribution_server.TRACKING_SERVICE.startswith(attribution_pb2.DESCRIPTOR.package)
    for name in ("attribution", "fraud"):
        probe = _container(_deployment(objects, name))["readinessProbe"]
        assert probe["grpc"]["service"] in API_SERVICES[name], f"{name}: {probe}"


def test_liveness_asks_the_name_that_follows_only_the_process(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    names = {
        _container(_deployment(objects, name))[kind]["grpc"]["service"]
        for name in ("attribution", "fraud")
        for kind in ("startupProbe", "livenessProbe")
    }
    assert len(names) == 1
    liveness = _liveness_service()
    if liveness is None:
        pytest.skip(
            "services/common/readiness.py (liveness apart from readiness) is not in this checkout: "
            f"the probes ask {names.pop()!r}, which only that work serves"
        )
    assert names == {liveness}


def test_gateway_probes_its_http_health(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(_deployment(objects, "gateway"))
    port = int(_values(container)["ASCRIBE_GATEWAY_PORT"])
    paths = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        assert _probe_port(container, probe) == port, kind
        paths[kind] = probe["httpGet"]["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    routes = (REPO / "gateway" / "app.py").read_text()
    for path in set(paths.values()):
        assert f'add_get("{path}"' in routes, path


def test_fraud_may_be_called_only_by_attribution(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    values = _values(_container(_deployment(objects, "fraud")))
    assert values["ASCRIBE_TLS_CLIENT_AUTH"] == "1"
    assert values["ASCRIBE_FRAUD_ALLOWED_CLIENTS"] == "attribution"
