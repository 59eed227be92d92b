"""IP intelligence: Tor exits, datacenter and VPN ranges in longest-prefix tries.

The lists are plain text files in ``ASCRIBE_IPINTEL_DIR`` (one IP or CIDR a
line, ``#`` comments allowed), named by kind: ``datacenter-*.txt``,
``vpn-*.txt``, ``tor-*.txt``. A line may be IPv4 or IPv6 whatever the file's
name says, so a list that mixes both still loads. All lists merge into one
pytricia trie per family whose entries know every list covering them (an
address can be in several: a VPN provider hosted in a datacenter is both), so
a lookup is one C call, about half a microsecond.

Reloading builds a new ``IpIntel`` and swaps it in whole, so a check never
sees half a reload.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pytricia

logger = logging.getLogger(__name__)



class IpList(StrEnum):
    TOR = "tor"
    DATACENTER = "datacenter"
    VPN = "vpn"


def subscriber_key(ip: str) -> str:
    """The address as one subscriber holds it: IPv4 as is, IPv6 by its /64.

    An IPv6 subscriber is given a whole /64 and its privacy addresses rotate
    inside it, so per-address counters would miss a flood from one /64 and
    count one customer's phone as many places.
    """
    if ":" not in ip:
        return ip
    packed = socket.inet_pton(socket.AF_INET6, ip)
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


@dataclass(frozen=True)
class IpInfo:
    """Which lists an address is in; each value is the matched entry."""

    tor: str | None = None
    datacenter: str | None = None
    vpn: str | None = None


NOT_LISTED = IpInfo()


def _new_tries() -> tuple[pytricia.PyTricia, pytricia.PyTricia]:
    return pytricia.PyTricia(32, socket.AF_INET), pytricia.PyTricia(128, socket.AF_INET6)


@dataclass
class IpIntel:
    """One loaded snapshot of the lists (immutable once built)."""

    available: bool
    tries: dict[IpList, tuple[pytricia.PyTricia, pytricia.PyTricia]] = field(default_factory=dict)
    counts: dict[IpList, int] = field(default_factory=dict)
    source: str = ""
    _merged: tuple[pytricia.PyTricia, pytricia.PyTricia] | None = field(default=None, repr=False)

    @classmethod
    def empty(cls) -> IpIntel:
        return cls(available=False)

    @classmethod
    def from_lines(cls, lists: Mapping[IpList, Iterable[str]], source: str = "memory") -> IpIntel:
        intel = cls(available=True, source=source)
        for kind, lines in lists.items():
            v4, v6 = intel.tries.setdefault(kind, _new_tries())
            count = intel.counts.get(kind, 0)
            for raw in lines:
                entry = raw.split("#", 1)[0].strip()
                if not entry:
                    continue
                trie = v6 if ":" in entry else v4
                try:
                    trie.insert(entry, entry)
                except (ValueError, KeyError, SystemError):
                    logger.debug("ipintel: skipping malformed entry %r", entry)
                    continue
                count += 1
            intel.counts[kind] = count
        intel._merge()
        # The per-list tries only fed the merge; keeping them would double the memory.
        intel.tries.clear()
        return intel

    @classmethod
    def load(cls, folder: Path) -> IpIntel:
        """Loads every list in ``folder``; a missing folder turns IP signals off, loudly."""
        if not folder.is_dir():
            logger.warning(
                "IP intelligence folder %s is missing: Tor, datacenter and VPN signals are OFF "
                "(run `make ipintel` or set ASCRIBE_IPINTEL_DIR)",
                folder,
            )
            return cls.empty()
        started = time.perf_counter()
        files: dict[IpList, list[Path]] = {kind: [] for kind in IpList}
        for path in sorted(folder.glob("*.txt")):
            for kind in IpList:
                if path.name.startswith(kind.value):
                    files[kind].append(path)
        lists: dict[IpList, list[str]] = {}
        for kind, paths in files.items():
            if not paths:
                logger.warning("IP intelligence: no %s list in %s, that signal is off", kind.value, folder)
                continue
            lines: list[str] = []
            for path in paths:
                lines.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
            lists[kind] = lines
        intel = cls.from_lines(lists, source=str(folder))
        if not intel.counts:
            intel.available = False
        logger.info(
            "IP intelligence loaded from %s in %.0f ms: %s",
            folder,
            (time.perf_counter() - started) * 1000,
            ", ".join(f"{kind.value}={count}" for kind, count in intel.counts.items()) or "nothing",
        )
        return intel

    def lookup(self, ip: str) -> IpInfo:
        """``ip`` must be canonical (see ``normalize_ip``): one trie lookup, under a microsecond."""
        merged = self._merged
        if merged is None:
            return NOT_LISTED
        info: IpInfo | None = merged[1 if ":" in ip else 0].get(ip)
        return NOT_LISTED if info is None else info

    def _merge(self) -> None:
        """One trie per family whose every prefix knows all the lists covering it.

        A longest-prefix match only finds the most specific entry, so each
        entry inherits what its enclosing entries (of any list) say; a lookup
        is then a single trie get, whatever the number of lists.
        """
        if not self.tries:
            self._merged = None
            return
        merged = _new_tries()
        for family in (0, 1):
            own: dict[str, dict[str, str]] = {}
            host_suffix = "/128" if family else "/32"
            for kind, pair in self.tries.items():
                for prefix in pair[family]:
                    own.setdefault(prefix, {})[kind.value] = prefix.removesuffix(host_suffix)
            trie = merged[family]
            for prefix in own:
                trie.insert(prefix, None)
            for prefix, kinds in own.items():
                found = dict(kinds)
                parent = trie.parent(prefix)
                while parent is not None:
                    for kind_name, entry in own[parent].items():
                        found.setdefault(kind_name, entry)
                    parent = trie.parent(parent)
                trie.insert(prefix, IpInfo(**found))
        self._merged = merged


class IpIntelHolder:
    """The current snapshot, swapped whole on reload (SIGHUP)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.current = IpIntel.load(folder)

    def reload(self) -> IpIntel:
        """Builds a new snapshot off to the side, then swaps it in."""
        fresh = IpIntel.load(self.folder)
        if not fresh.available and self.current.available:
            logger.warning("IP intelligence reload found no lists in %s; keeping the previous ones", self.folder)
            return self.current
        self.current = fresh
        return fresh
