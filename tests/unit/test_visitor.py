"""Country and device of a visitor: one derivation, from maintained libraries."""

from __future__ import annotations

import pytest

from services.attribution.common.visitor import VisitorDerivation, device_of


@pytest.mark.parametrize(
    ("user_agent", "device"),
    [
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/17.0 Mobile/15E148 Safari/604.1", "mobile"),
        ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
         "Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
         "Safari/537.36", "tablet"),
        ("Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/16.0 Mobile/15E148 Safari/604.1", "tablet"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 "
         "Safari/537.36", "desktop"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "other"),
        ("curl/8.5.0", "other"),
    ],
)
def test_device_class_of_a_user_agent(user_agent: str, device: str) -> None:
    assert device_of(user_agent) == device
    assert VisitorDerivation().device(user_agent) == device


def test_no_user_agent_is_no_device() -> None:
    assert VisitorDerivation().device("") is None


def test_country_from_the_packaged_registry_data() -> None:
    visitors = VisitorDerivation()
    assert visitors.country("8.8.8.8") == "US"
    assert visitors.country("2a00:1450:4001::1") == "IE"
    assert visitors.country("10.1.2.3") == ""  # private: no country
    assert visitors.country("") == ""
    assert "iptocc" in visitors.source
