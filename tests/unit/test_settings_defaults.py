"""Each service's settings with nothing set are its dataclass's defaults.

The defaults are written once, on the dataclass; ``from_env`` reads them from
there. This test keeps it so: a default typed into ``from_env`` that differs
from the dataclass's would make the service run differently from how it is
built in tests and documented.
"""

from __future__ import annotations

import os

import pytest

from gateway.config import Settings as GatewaySettings
from services.attribution.config import Settings as AttributionSettings
from services.fraud.config import Settings as FraudSettings

DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def nothing_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ASCRIBE_"):
            monkeypatch.delenv(name)


def test_gateway() -> None:
    assert GatewaySettings.from_env() == GatewaySettings()


def test_attribution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_DATABASE_URL", DATABASE_URL)
    assert AttributionSettings.from_env() == AttributionSettings(database_url=DATABASE_URL)


def test_fraud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCRIBE_REDIS_URL", REDIS_URL)
    settings = FraudSettings.from_env()
    assert settings == FraudSettings(redis_url=REDIS_URL)
    # Compared field by field too, so a failure names the setting.
    defaults = FraudSettings(redis_url=REDIS_URL)
    assert vars(settings.rules) == vars(defaults.rules)
    assert vars(settings.store) == vars(defaults.store)
