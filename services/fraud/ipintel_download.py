"""Downloading the IP lists: `make ipintel` and the fraud service's scheduled refresh.

Sources (the same as the repository's snapshot in data/ipintel names):
- datacenter and VPN ranges, IPv4 and IPv6: X4BNet/lists_vpn (MIT), output/datacenter and output/vpn;
- Tor exit relays: the Tor Project's bulk exit list, which is current (exits
  churn within 48 hours), falling back to SecOps-Institute/Tor-IP-Addresses (MIT).

Each list is validated (every kept line must parse as an IP or CIDR, and a
list must not shrink to almost nothing, which is what a captive portal or an
error page looks like) and then replaced atomically, so a running fraud
service never reads half a file. SOURCES.tsv records each list's date, source
and licence; a list that fails keeps its previous copy and its previous line.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from services.fraud.ipintel import MANIFEST

X4B = "https://raw.githubusercontent.com/X4BNet/lists_vpn/main/output"
X4B_LICENCE = "MIT (X4BNet/lists_vpn)"
USER_AGENT = "ascribe-ipintel/1 (+https://github.com/ascribe)"
MANIFEST_HEADER = "# file\tentries\tas_of\tsource\tlicence"


@dataclass(frozen=True)
class Source:
    filename: str
    urls: tuple[str, ...]  # tried in order
    minimum_entries: int
    licences: tuple[str, ...]  # one per url


SOURCES = (
    Source("datacenter-ipv4.txt", (f"{X4B}/datacenter/ipv4.txt",), 1000, (X4B_LICENCE,)),
    Source("datacenter-ipv6.txt", (f"{X4B}/datacenter/ipv6.txt",), 100, (X4B_LICENCE,)),
    Source("vpn-ipv4.txt", (f"{X4B}/vpn/ipv4.txt",), 1000, (X4B_LICENCE,)),
    Source("vpn-ipv6.txt", (f"{X4B}/vpn/ipv6.txt",), 10, (X4B_LICENCE,)),
    Source(
        "tor-exit-nodes.txt",
        (
            "https://check.torproject.org/torbulkexitlist",
            "https://raw.githubusercontent.com/SecOps-Institute/Tor-IP-Addresses/master/tor-exit-nodes.lst",
        ),
        100,
        ("CC0 (Tor Project exit list data)", "MIT (SecOps-Institute/Tor-IP-Addresses)"),
    ),
)


@dataclass
class RefreshReport:
    """What a refresh did: the lists written (name, entries, url) and the ones that failed."""

    written: list[tuple[str, int, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def parse_entries(text: str) -> list[str]:
    """The valid IP/CIDR entries of a downloaded list, normalized; junk lines dropped."""
    entries: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            network = ipaddress.ip_network(line, strict=False)
        except ValueError:
            continue
        single = network.num_addresses == 1
        entries.append(str(network.network_address) if single else str(network))
    return entries


def fetch(url: str, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


def write_atomically(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def download(source: Source, folder: Path, timeout: float) -> tuple[int, str, str]:
    """Writes ``source``'s list into ``folder``; returns its entries, url and licence."""
    errors: list[str] = []
    for url, licence in zip(source.urls, source.licences, strict=True):
        try:
            entries = parse_entries(fetch(url, timeout))
        except (OSError, ValueError) as error:  # ValueError: a malformed URL
            errors.append(f"{url}: {error}")
            continue
        if len(entries) < source.minimum_entries:
            errors.append(f"{url}: only {len(entries)} entries (expected at least {source.minimum_entries})")
            continue
        write_atomically(folder / source.filename, entries)
        return len(entries), url, licence
    raise RuntimeError("; ".join(errors))


def _manifest_lines(folder: Path) -> dict[str, str]:
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except OSError:
        return {}
    return {
        line.split("\t", 1)[0]: line
        for line in text.splitlines()
        if line and not line.startswith("#") and line.count("\t") >= 3
    }


def refresh(
    folder: Path,
    sources: tuple[Source, ...] = SOURCES,
    timeout: float = 30.0,
    stop: threading.Event | None = None,
) -> RefreshReport:
    """Downloads every list into ``folder`` and updates its SOURCES.tsv.

    Blocking: the service runs it in a thread, and sets ``stop`` when it
    shuts down so that no further list is started.
    """
    report = RefreshReport()
    lines = _manifest_lines(folder)
    for source in sources:
        if stop is not None and stop.is_set():
            break
        try:
            count, url, licence = download(source, folder, timeout)
        except RuntimeError as error:
            report.failed.append((source.filename, str(error)))
            continue
        as_of = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        lines[source.filename] = "\t".join((source.filename, str(count), as_of, url, licence))
        report.written.append((source.filename, count, url))
    if report.written:
        write_atomically(folder / MANIFEST, [MANIFEST_HEADER, *(lines[name] for name in sorted(lines))])
    return report
