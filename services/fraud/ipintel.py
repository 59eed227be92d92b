"""IP intelligence: Tor exits, datacenter and VPN ranges in longest-prefix tries.

The lists are plain text files in one folder (one IP or CIDR a line, ``#``
comments allowed), named by kind: ``datacenter-*.txt``, ``vpn-*.txt``,
``tor-*.txt``. The folder is ``ASCRIBE_IPINTEL_DIR`` when set; unset, it is
the copy ``make ipintel`` downloaded (``.data/ipintel``) when that copy has
every list and is newer, else the dated snapshot the repository carries
(``data/ipintel``; in a wheel, ``services/fraud/ipintel_snapshot``), so a
fresh checkout or a ``pip install .`` has every signal on.

A folder's ``SOURCES.tsv`` says when each list was current (``as_of``); a
list it does not name is dated by its file's modification time. The lists'
dates, not the files', decide which folder is newer: a ``git clone`` gives
the snapshot's files today's modification time. A line may be IPv4 or IPv6 whatever the file's
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
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import pytricia

from services.common.ip import subscriber_key as subscriber_key  # one home; the fraud keys use it

logger = logging.getLogger(__name__)


# The dated snapshot of the lists in the repository (with its README and
# licences); a wheel carries the same files beside this module (setup.py), so
# `pip install .` has every signal on without ASCRIBE_IPINTEL_DIR.
CHECKOUT_LISTS = Path(__file__).resolve().parents[2] / "data" / "ipintel"
PACKAGED_LISTS = Path(__file__).resolve().parent / "ipintel_snapshot"
REPOSITORY_LISTS = CHECKOUT_LISTS if CHECKOUT_LISTS.is_dir() else PACKAGED_LISTS
# Per list: entries, the time it was current, where it came from, its licence.
MANIFEST = "SOURCES.tsv"
# Tor exits churn within 48 hours and hosting ranges move within weeks: a
# list older than this still loads, with a warning that says how to refresh.
STALE_AFTER_SECONDS = 7 * 86400


class IpList(StrEnum):
    TOR = "tor"
    DATACENTER = "datacenter"
    VPN = "vpn"


@dataclass(frozen=True)
class IpInfo:
    """Which lists an address is in; each value is the matched entry."""

    tor: str | None = None
    datacenter: str | None = None
    vpn: str | None = None


NOT_LISTED = IpInfo()


def list_kind(path: Path) -> IpList | None:
    for kind in IpList:
        if path.name.startswith(kind.value):
            return kind
    return None


def read_manifest(folder: Path) -> dict[str, float]:
    """``as_of`` (epoch seconds) per file name from the folder's SOURCES.tsv; {} without one.

    Lines are ``file<TAB>entries<TAB>as_of<TAB>source[<TAB>licence]``; a line
    whose third field is no ISO 8601 time (an older manifest) is skipped, so
    its list falls back to its file's modification time.
    """
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except OSError:
        return {}
    dates: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) < 3:
            continue
        try:
            at = datetime.fromisoformat(fields[2].strip())
        except ValueError:
            continue
        dates[fields[0].strip()] = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
    return dates


def list_dates(folder: Path) -> dict[IpList, float]:
    """When each kind of list in ``folder`` was current: its oldest file's ``as_of``."""
    manifest = read_manifest(folder)
    dates: dict[IpList, float] = {}
    for path in sorted(folder.glob("*.txt")):
        kind = list_kind(path)
        if kind is None:
            continue
        try:
            at = manifest.get(path.name) or path.stat().st_mtime
        except OSError:
            continue
        dates[kind] = min(dates.get(kind, at), at)
    return dates


def choose_folder(configured: Path | None, downloaded: Path, snapshot: Path = REPOSITORY_LISTS) -> Path:
    """The folder to load: ``configured`` when set, else the newer complete copy.

    The downloaded copy must hold every kind of list (a ``make ipintel`` that
    failed half way must not switch a signal off) and its oldest list must be
    newer than the snapshot's oldest.
    """
    if configured is not None:
        return configured
    fetched = list_dates(downloaded) if downloaded.is_dir() else {}
    if len(fetched) == len(IpList):
        shipped = list_dates(snapshot)
        if not shipped or min(fetched.values()) > min(shipped.values()):
            return downloaded
    return snapshot


def _new_tries() -> tuple[pytricia.PyTricia, pytricia.PyTricia]:
    return pytricia.PyTricia(32, socket.AF_INET), pytricia.PyTricia(128, socket.AF_INET6)


@dataclass
class IpIntel:
    """One loaded snapshot of the lists (immutable once built)."""

    available: bool
    tries: dict[IpList, tuple[pytricia.PyTricia, pytricia.PyTricia]] = field(default_factory=dict)
    counts: dict[IpList, int] = field(default_factory=dict)
    source: str = ""
    # When each loaded list was current (epoch seconds), see ``list_dates``.
    as_of: dict[IpList, float] = field(default_factory=dict)
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
            kind_of = list_kind(path)
            if kind_of is not None:
                files[kind_of].append(path)
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
        dates = list_dates(folder)
        intel.as_of = {kind: at for kind, at in dates.items() if intel.counts.get(kind)}
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


    def age_seconds(self, kind: IpList, now: float | None = None) -> float:
        """How old the ``kind`` list is; +inf when it is missing (its signal is off)."""
        at = self.as_of.get(kind)
        if at is None:
            return float("inf")
        return max(0.0, (time.time() if now is None else now) - at)

    def summary(self, now: float | None = None) -> tuple[int, str]:
        """The start-up line: each list's size, date and age, and what to do when they are old.

        Returns a logging level with the text: WARNING when a list is missing
        or stale, so the line is not lost among the INFO lines.
        """
        now = time.time() if now is None else now
        parts: list[str] = []
        stale: list[str] = []
        for kind in IpList:
            at = self.as_of.get(kind)
            if at is None or not self.counts.get(kind):
                parts.append(f"{kind.value} MISSING (signal off)")
                stale.append(kind.value)
                continue
            age_days = self.age_seconds(kind, now) / 86400
            day = datetime.fromtimestamp(at, UTC).date().isoformat()
            parts.append(f"{kind.value} {self.counts[kind]} entries as of {day} ({age_days:.0f} days old)")
            if age_days * 86400 > STALE_AFTER_SECONDS:
                stale.append(kind.value)
        text = f"IP lists from {self.source or 'nowhere'}: " + ", ".join(parts)
        if stale:
            text += (
                f"; out of date or missing: {', '.join(stale)} (run `make ipintel`, "
                "or set ASCRIBE_IPINTEL_REFRESH_HOURS to refresh on a schedule)"
            )
            return logging.WARNING, text
        return logging.INFO, text


class IpIntelHolder:
    """The current snapshot, swapped whole on reload (SIGHUP or a scheduled refresh).

    ``folder`` None chooses on every load between ``downloaded`` (what
    ``make ipintel`` or a scheduled refresh wrote) and the repository's
    snapshot, so a refresh into ``downloaded`` takes over without a restart.
    """

    def __init__(
        self, folder: Path | None, *, downloaded: Path = Path(".data/ipintel"), snapshot: Path = REPOSITORY_LISTS
    ) -> None:
        self.configured = folder
        self.downloaded = downloaded
        self.snapshot = snapshot
        self.current = self._load()

    @property
    def folder(self) -> Path:
        """Where the lists are loaded from now."""
        return choose_folder(self.configured, self.downloaded, self.snapshot)

    @property
    def refresh_folder(self) -> Path:
        """Where a refresh downloads to: the configured folder, else the downloaded copy."""
        return self.configured if self.configured is not None else self.downloaded

    def _load(self) -> IpIntel:
        intel = IpIntel.load(self.folder)
        level, text = intel.summary()
        logger.log(level, "%s", text)
        return intel

    def reload(self) -> IpIntel:
        """Builds a new snapshot off to the side, then swaps it in."""
        fresh = self._load()
        if not fresh.available and self.current.available:
            logger.warning("IP intelligence reload found no lists in %s; keeping the previous ones", fresh.source)
            return self.current
        self.current = fresh
        return fresh
