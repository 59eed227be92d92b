"""make ipintel: download the fraud service's IP lists into ASCRIBE_IPINTEL_DIR (.data/ipintel).

Sources (the same as ../shared/data/ipintel/README.md names):
- datacenter and VPN ranges, IPv4 and IPv6: X4BNet/lists_vpn (MIT), output/datacenter and output/vpn;
- Tor exit relays: the Tor Project's bulk exit list, which is current (exits
  churn within 48 hours), falling back to SecOps-Institute/Tor-IP-Addresses (MIT).

Each list is validated (every kept line must parse as an IP or CIDR, and a
list must not shrink to almost nothing, which is what a captive portal or an
error page looks like) and then replaced atomically, so a running fraud
service never reads half a file. Send the service SIGHUP to load them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

X4B = "https://raw.githubusercontent.com/X4BNet/lists_vpn/main/output"
USER_AGENT = "ascribe-ipintel/1 (+https://github.com/ascribe)"


@dataclass(frozen=True)
class Source:
    filename: str
    urls: tuple[str, ...]  # tried in order
    minimum_entries: int


SOURCES = (
    Source("datacenter-ipv4.txt", (f"{X4B}/datacenter/ipv4.txt",), 1000),
    Source("datacenter-ipv6.txt", (f"{X4B}/datacenter/ipv6.txt",), 100),
    Source("vpn-ipv4.txt", (f"{X4B}/vpn/ipv4.txt",), 1000),
    Source("vpn-ipv6.txt", (f"{X4B}/vpn/ipv6.txt",), 10),
    Source(
        "tor-exit-nodes.txt",
        (
            "https://check.torproject.org/torbulkexitlist",
            "https://raw.githubusercontent.com/SecOps-Institute/Tor-IP-Addresses/master/tor-exit-nodes.lst",
        ),
        100,
    ),
)


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


def download(source: Source, folder: Path, timeout: float) -> tuple[int, str]:
    errors: list[str] = []
    for url in source.urls:
        try:
            entries = parse_entries(fetch(url, timeout))
        except OSError as error:
            errors.append(f"{url}: {error}")
            continue
        if len(entries) < source.minimum_entries:
            errors.append(f"{url}: only {len(entries)} entries (expected at least {source.minimum_entries})")
            continue
        write_atomically(folder / source.filename, entries)
        return len(entries), url
    raise RuntimeError("; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("ASCRIBE_IPINTEL_DIR") or ".data/ipintel"),
        help="where to write the lists (default: $ASCRIBE_IPINTEL_DIR or .data/ipintel)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per download")
    args = parser.parse_args(argv)
    folder: Path = args.dir
    failures = 0
    provenance = [f"# downloaded {datetime.now(UTC).isoformat(timespec='seconds')}"]
    for source in SOURCES:
        try:
            count, url = download(source, folder, args.timeout)
        except RuntimeError as error:
            failures += 1
            print(f"ipintel: {source.filename}: FAILED ({error}); the previous copy, if any, is kept",
                  file=sys.stderr)
            continue
        provenance.append(f"{source.filename}\t{count}\t{url}")
        print(f"ipintel: {source.filename}: {count} entries from {url}")
    if len(provenance) > 1:
        write_atomically(folder / "SOURCES.tsv", provenance)
    if failures:
        print(f"ipintel: {failures} of {len(SOURCES)} lists failed", file=sys.stderr)
        return 1
    print(f"ipintel: lists are in {folder}; send the fraud service SIGHUP to reload them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
