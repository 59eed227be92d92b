"""Fraud service settings from the environment: defaults, overrides, fail-fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.fraud.config import Settings
from services.fraud.server import FRAUD_SERVICE, required_tokens
from services.fraud.store import FraudStore


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ASCRIBE_FRAUD_ADDR", "ASCRIBE_INTERNAL_TOKEN", "ASCRIBE_IPINTEL_DIR", "ASCRIBE_FRAUD_KEY_PREFIX",
        "ASCRIBE_DATA_DIR", "ASCRIBE_IPINTEL_REFRESH_HOURS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = Settings.from_env()
    assert settings.addr == "127.0.0.1:50052"
    assert settings.metrics_port == 9102
    # Unset: chosen at each load between make ipintel's copy and the repository's snapshot.
    assert settings.ipintel_dir is None
    assert settings.ipintel_download_dir == Path(".data/ipintel")
    assert settings.ipintel_refresh_seconds == 0  # no scheduled download unless asked for
    assert settings.store.prefix == "ascribe"
    assert settings.rules.clicks_per_ip_minute == 10 and settings.rules.ctit_reject_seconds == 10
    assert settings.check_linger_ms == 2


def test_ipintel_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ASCRIBE_IPINTEL_DIR", "/srv/lists")
    monkeypatch.setenv("ASCRIBE_DATA_DIR", "/var/lib/ascribe")
    monkeypatch.setenv("ASCRIBE_IPINTEL_REFRESH_HOURS", "6")
    settings = Settings.from_env()
    assert settings.ipintel_dir == Path("/srv/lists")
    assert settings.ipintel_download_dir == Path("/var/lib/ascribe/ipintel")
    assert settings.ipintel_refresh_seconds == 6 * 3600


def test_overrides_and_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://:secret-pw@127.0.0.1:6379/0")
    monkeypatch.setenv("ASCRIBE_INTERNAL_TOKEN", "secret-token")
    monkeypatch.setenv("ASCRIBE_FRAUD_KEY_PREFIX", "t1")
    monkeypatch.setenv("ASCRIBE_FRAUD_CLICKS_PER_IP_MINUTE", "20")
    monkeypatch.setenv("ASCRIBE_FRAUD_WEIGHTS", "vpn_ip=30")
    monkeypatch.setenv("ASCRIBE_FRAUD_CHECK_LINGER_MS", "0")
    settings = Settings.from_env()
    assert settings.check_linger_ms == 0
    assert settings.store.prefix == "t1" and settings.rules.clicks_per_ip_minute == 20
    assert settings.rules.weight("vpn_ip") == 30
    assert "secret" not in repr(settings)
    assert set(required_tokens(settings).values()) == {"secret-token"}
    assert f"/{FRAUD_SERVICE}/CheckClickBatch" in required_tokens(settings)
    assert len(required_tokens(settings)) == 7  # CheckCodeGuessing too


def test_shards_are_sized_for_the_populations(monkeypatch: pytest.MonkeyPatch) -> None:
    """About 64 members a hash at the stated peak, per key bucket, at least one."""
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ASCRIBE_FRAUD_ADDRESSES_PER_HOUR", "9000000")
    monkeypatch.setenv("ASCRIBE_FRAUD_VISITORS_PER_DAY", "100")
    monkeypatch.setenv("ASCRIBE_FRAUD_KEY_BUCKETS", "8")
    config = Settings.from_env().store
    assert (config.addresses_per_hour, config.visitors_per_day) == (9_000_000, 100)
    store = FraudStore(None, config, transport=object())  # type: ignore[arg-type]  # no I/O here
    assert store.ip_clicks.shards == 17_579  # ceil(9,000,000 / (8 x 64))
    assert store.first_visit.shards == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ASCRIBE_REDIS_URL", ""),
        ("ASCRIBE_FRAUD_ADDR", "0.0.0.0:50052"),  # off loopback without a token
        ("ASCRIBE_FRAUD_WEIGHTS", "made_up=3"),
        ("ASCRIBE_FRAUD_CLICKS_PER_IP_MINUTE", "ten"),
        ("ASCRIBE_FRAUD_REVIEW_SCORE", "95"),
        ("ASCRIBE_FRAUD_CHECK_LINGER_MS", "-1"),
        ("ASCRIBE_FRAUD_VISITORS_PER_DAY", "0"),
        ("ASCRIBE_FRAUD_ADDRESSES_PER_HOUR", "many"),
        ("ASCRIBE_IPINTEL_REFRESH_HOURS", "0.5"),  # below the minimum: hammers the upstream servers
        ("ASCRIBE_IPINTEL_REFRESH_HOURS", "-1"),
        ("ASCRIBE_IPINTEL_REFRESH_HOURS", "nan"),
        ("ASCRIBE_IPINTEL_REFRESH_HOURS", "daily"),
    ],
)
def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.delenv("ASCRIBE_INTERNAL_TOKEN", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        Settings.from_env()
