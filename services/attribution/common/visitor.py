"""Where a visitor is and what they browse with: one derivation for clicks and conversions.

Country (ISO 3166-1 alpha-2) comes from the visitor's IP: a MaxMind or DB-IP
``.mmdb`` file when ``ASCRIBE_GEOIP_DB`` names one (read with ``maxminddb``),
otherwise the offline data the ``iptocc`` wheel ships (the five Regional
Internet Registries' delegation files, refreshed with every release of the
package; the pinned 3.3.170 was built in October 2026). RIR data names the
country a block is assigned to, which agrees with MaxMind for about 95 % of
IPv4 addresses: good enough for reports and country rules, and a
``.mmdb`` is one setting away.

Device class comes from the user agent: ``ua-parser`` (with its Rust
matcher, ``ua-parser-rs``) names the browser, OS and device, and
``user-agents-ng`` decides from those whether it is a tablet, a phone, a
desktop or ``other`` (bots, TVs, consoles, scripts). user-agents-ng's own
entry point goes through ua-parser's legacy pure-Python API, about 700 µs for
a user agent never seen before here, against about 50 µs through the
matcher, so ``_Classified`` feeds it the matcher's answer. A program's
traffic repeats a limited set of user agents, so classes are also cached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import iptocc
import maxminddb
import ua_parser
from user_agents.parsers import UserAgent, parse_browser, parse_device, parse_operating_system

from services.attribution.common.models import DeviceType

logger = logging.getLogger(__name__)

# Distinct user agents whose device class is kept (a few hundred bytes each).
DEVICE_CACHE_SIZE = 8192


class VisitorDerivation:
    """``country(ip)`` and ``device(user_agent)``, from the configured sources."""

    def __init__(self, geoip_db: Path | None = None) -> None:
        self.source = f"{geoip_db} (maxminddb)" if geoip_db else f"iptocc {_version('iptocc')} (RIR data)"
        self._country: Callable[[str], str] = _mmdb_country(geoip_db) if geoip_db else _rir_country
        # The matcher compiles its rules on first use (a few hundred ms): at
        # start-up, not on a visitor's click.
        _Classified("Mozilla/5.0 (start-up)")

    def country(self, ip: str) -> str:
        """The upper-case alpha-2 country of a canonical IP address; "" when unknown or none."""
        return self._country(ip) if ip else ""

    @staticmethod
    def device(user_agent: str) -> DeviceType | None:
        """The device class of a user agent; None without one."""
        return device_of(user_agent) if user_agent else None


class _Classified(UserAgent):
    """user-agents-ng's classification of what ``ua_parser.parse`` found."""

    def __init__(self, user_agent_string: str) -> None:
        found = ua_parser.parse(user_agent_string).with_defaults()
        self.ua_string = user_agent_string
        self.os = parse_operating_system(
            found.os.family, found.os.major, found.os.minor, found.os.patch, found.os.patch_minor
        )
        self.browser = parse_browser(
            found.user_agent.family, found.user_agent.major, found.user_agent.minor, found.user_agent.patch
        )
        self.device = parse_device(found.device.family, found.device.brand, found.device.model)


@functools.lru_cache(maxsize=DEVICE_CACHE_SIZE)
def device_of(user_agent: str) -> DeviceType:
    parsed = _Classified(user_agent)
    if parsed.is_bot:
        return "other"
    if parsed.is_tablet:
        return "tablet"
    if parsed.is_mobile:
        return "mobile"
    if parsed.is_pc:
        return "desktop"
    return "other"


def _rir_country(ip: str) -> str:
    found = iptocc.country_code(ip)
    return found if isinstance(found, str) else ""


def _mmdb_country(path: Path) -> Callable[[str], str]:
    # MODE_AUTO memory-maps the file: one copy shared by every worker process.
    reader = maxminddb.open_database(str(path))

    def country(ip: str) -> str:
        try:
            record: Any = reader.get(ip)
        except ValueError:
            return ""
        if not isinstance(record, dict):
            return ""
        for key in ("country", "registered_country"):
            entry = record.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("iso_code"), str):
                return str(entry["iso_code"]).upper()
        return ""

    return country


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
