"""Gateway settings from the environment: defaults, fail-fast errors, the loopback rule."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.config import Settings
from services.common.env import ConfigError

VARIABLES = (
    "ASCRIBE_GATEWAY_HOST",
    "ASCRIBE_GATEWAY_PORT",
    "ASCRIBE_ATTRIBUTION_ADDR",
    "ASCRIBE_FRAUD_ADDR",
    "ASCRIBE_INTERNAL_TOKEN",
    "ASCRIBE_TRUSTED_PROXIES",
    "ASCRIBE_DEBUG_HEADERS",
    "ASCRIBE_GATEWAY_DEADLINE_MS",
    "ASCRIBE_GATEWAY_METRICS_HOST",
    "ASCRIBE_GATEWAY_METRICS_PORT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = Settings.from_env()
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.attribution_addr == "127.0.0.1:50051"
    assert settings.internal_token is None
    assert settings.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert settings.debug_headers is False
    assert settings.deadline_ms == 2000
    # 9103, not 9100 (node_exporter's) and not the tracking port.
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9103)


def test_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("ASCRIBE_GATEWAY_PORT", "9000")
    monkeypatch.setenv("ASCRIBE_INTERNAL_TOKEN", "tok")
    monkeypatch.setenv("ASCRIBE_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1")
    monkeypatch.setenv("ASCRIBE_DEBUG_HEADERS", "1")
    monkeypatch.setenv("ASCRIBE_GATEWAY_DEADLINE_MS", "750")
    settings = Settings.from_env()
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
    )
    assert settings.debug_headers is True
    assert settings.deadline_seconds == 0.75
    assert "tok" not in repr(settings)


def test_public_bind_without_internal_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_GATEWAY_HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="ASCRIBE_INTERNAL_TOKEN"):
        Settings.from_env()


def test_remote_attribution_without_internal_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_ATTRIBUTION_ADDR", "attribution:50051")
    with pytest.raises(ConfigError, match="ASCRIBE_INTERNAL_TOKEN"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ASCRIBE_TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip"),
        ("ASCRIBE_GATEWAY_PORT", "http"),
        ("ASCRIBE_GATEWAY_PORT", "70000"),
        ("ASCRIBE_GATEWAY_DEADLINE_MS", "0"),
        ("ASCRIBE_DEBUG_HEADERS", "maybe"),
        ("ASCRIBE_ATTRIBUTION_ADDR", "no-port"),
    ],
)
def test_malformed_values_fail_fast(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Settings.from_env()


def test_metrics_listener_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_GATEWAY_METRICS_PORT", "9300")
    assert Settings.from_env().metrics_port == 9300
    monkeypatch.setenv("ASCRIBE_GATEWAY_METRICS_PORT", "0")
    assert Settings.from_env().metrics_port == 0  # off
    monkeypatch.setenv("ASCRIBE_GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("ASCRIBE_INTERNAL_TOKEN", "tok")
    monkeypatch.delenv("ASCRIBE_GATEWAY_METRICS_PORT")
    assert Settings.from_env().metrics_host == "0.0.0.0"  # follows the gateway's host unless set


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"ASCRIBE_GATEWAY_METRICS_PORT": "70000"}, "ASCRIBE_GATEWAY_METRICS_PORT"),
        ({"ASCRIBE_GATEWAY_METRICS_PORT": "nine"}, "ASCRIBE_GATEWAY_METRICS_PORT"),
        ({"ASCRIBE_GATEWAY_METRICS_PORT": "8080"}, "must differ"),
        # A metrics listener off loopback is a listener off loopback: the token rule holds.
        ({"ASCRIBE_GATEWAY_METRICS_HOST": "0.0.0.0"}, "ASCRIBE_INTERNAL_TOKEN"),
    ],
)
def test_bad_metrics_settings_fail_fast(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env()


ADMISSION = (
    "ASCRIBE_GATEWAY_QUEUE_BUDGET_MS",
    "ASCRIBE_GATEWAY_MAX_CONNECTIONS",
    "ASCRIBE_GATEWAY_HEADER_TIMEOUT_MS",
    "ASCRIBE_GATEWAY_IDLE_TIMEOUT_MS",
    "ASCRIBE_GATEWAY_LISTEN_BACKLOG",
)


def test_admission_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ADMISSION:
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.queue_budget_ms == 250
    assert settings.max_connections == 1024
    assert (settings.header_timeout_ms, settings.idle_timeout_ms) == (5000, 15000)
    assert settings.listen_backlog >= 4096


@pytest.mark.parametrize("name", ADMISSION)
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_admission_settings_refuse_what_is_not_a_positive_number(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Settings.from_env()


def test_admission_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(ADMISSION, ("100", "2000", "3000", "4000", "8192"), strict=True):
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (settings.queue_budget_ms, settings.max_connections, settings.header_timeout_ms,
            settings.idle_timeout_ms, settings.listen_backlog) == (100, 2000, 3000, 4000, 8192)
