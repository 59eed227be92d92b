"""IP lists: loading, IPv4/IPv6 lookups, reload, a missing folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from services.common.ip import normalize_ip
from services.fraud.ipintel import NOT_LISTED, IpIntel, IpIntelHolder, IpList, subscriber_key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("81.2.69.142", "81.2.69.142"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::ffff:81.2.69.142", "81.2.69.142"),
        ("999.1.1.1", None),
        ("1.2.3", None),
        ("", None),
        ("not-an-ip", None),
        ("1.2.3.4/24", None),
        ("fe80::1%eth0", None),
    ],
)
def test_normalize_ip(text: str, expected: str | None) -> None:
    assert normalize_ip(text) == expected


def test_lookups_on_small_lists() -> None:
    intel = IpIntel.from_lines(
        {
            IpList.TOR: ["185.220.101.1", "2001:db8:dead::1", "# a comment", ""],
            IpList.DATACENTER: ["8.8.8.0/24", "2600:1f00::/24", "garbage"],
            IpList.VPN: ["2.26.0.0/16  # trailing comment"],
        }
    )
    assert intel.counts == {IpList.TOR: 2, IpList.DATACENTER: 2, IpList.VPN: 1}
    assert intel.lookup("185.220.101.1").tor == "185.220.101.1"
    assert intel.lookup("185.220.101.2") is NOT_LISTED
    assert intel.lookup("8.8.8.8").datacenter == "8.8.8.0/24"
    assert intel.lookup("2600:1f18::1").datacenter == "2600:1f00::/24"
    assert intel.lookup("2001:db8:dead::1").tor == "2001:db8:dead::1"
    assert intel.lookup("2.26.1.1").vpn == "2.26.0.0/16"
    assert intel.lookup("81.2.69.142") is NOT_LISTED


def test_shared_lists_load_fast_and_look_up_in_microseconds(ipintel_dir: Path) -> None:
    intel = IpIntel.load(ipintel_dir)
    assert intel.available
    assert all(intel.counts[kind] > 100 for kind in IpList)
    assert intel.lookup("8.8.8.8").datacenter  # the README's known trap
    tor = next(line for line in (ipintel_dir / "tor-exit-nodes.txt").read_text().splitlines() if line.strip())
    assert intel.lookup(tor.strip()).tor
    addresses = ["81.2.69.142", "8.8.8.8", "2a02:1234::1", tor.strip()] * 5000
    started = time.perf_counter()
    for address in addresses:
        intel.lookup(address)
    per_lookup_us = (time.perf_counter() - started) / len(addresses) * 1e6
    print(f"\nIP lookup: {per_lookup_us:.2f} µs")
    assert per_lookup_us < 5


def test_missing_folder_is_a_loud_warning_and_signals_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        intel = IpIntel.load(tmp_path / "nope")
    assert not intel.available
    assert intel.lookup("8.8.8.8") is NOT_LISTED
    assert any("signals are OFF" in record.message for record in caplog.records)


def test_reload_swaps_the_lists(tmp_path: Path) -> None:
    (tmp_path / "tor-exit-nodes.txt").write_text("185.220.101.1\n")
    holder = IpIntelHolder(tmp_path)
    assert holder.current.lookup("185.220.101.1").tor
    (tmp_path / "tor-exit-nodes.txt").write_text("185.220.101.2\n")
    (tmp_path / "vpn-ipv4.txt").write_text("2.26.0.0/16\n")
    holder.reload()
    assert holder.current.lookup("185.220.101.1") is NOT_LISTED
    assert holder.current.lookup("185.220.101.2").tor and holder.current.lookup("2.26.3.4").vpn


def test_reload_keeps_the_old_lists_when_the_folder_vanishes(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "tor-exit-nodes.txt").write_text("185.220.101.1\n")
    holder = IpIntelHolder(folder)
    (folder / "tor-exit-nodes.txt").unlink()
    folder.rmdir()
    holder.reload()
    assert holder.current.lookup("185.220.101.1").tor


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("81.2.69.142", "81.2.69.142"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
    ],
)
def test_subscriber_key_is_the_address_or_its_64(ip: str, key: str) -> None:
    assert subscriber_key(ip) == key
