"""The visitor's address: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import pytest

from gateway.client_ip import ClientIpResolver
from gateway.config import DEFAULT_TRUSTED_PROXIES, parse_networks

DEFAULT = ClientIpResolver(parse_networks(DEFAULT_TRUSTED_PROXIES, "test"))
BEHIND_LB = ClientIpResolver(parse_networks("10.0.0.0/8, 127.0.0.1/32", "test"))


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    assert DEFAULT.resolve("198.51.100.7", ["1.2.3.4"]) == "198.51.100.7"


def test_peer_without_header() -> None:
    assert DEFAULT.resolve("198.51.100.7") == "198.51.100.7"
    assert DEFAULT.resolve("127.0.0.1") == "127.0.0.1"


def test_trusted_peer_passes_on_the_last_hop() -> None:
    assert DEFAULT.resolve("127.0.0.1", ["203.0.113.9"]) == "203.0.113.9"
    assert DEFAULT.resolve("::1", ["2001:db8::9"]) == "2001:db8::9"


def test_first_untrusted_hop_from_the_right() -> None:
    # The client forged "6.6.6.6"; the load balancer (10.0.0.2) appended the real address.
    assert BEHIND_LB.resolve("10.0.0.5", ["6.6.6.6, 203.0.113.9, 10.0.0.2"]) == "203.0.113.9"


def test_several_header_lines_are_one_list() -> None:
    assert BEHIND_LB.resolve("10.0.0.5", ["6.6.6.6", "203.0.113.9", "10.0.0.2"]) == "203.0.113.9"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert BEHIND_LB.resolve("10.0.0.5", ["10.1.1.1, 10.0.0.2"]) == "10.1.1.1"


@pytest.mark.parametrize("header", ["garbage", "203.0.113.9, garbage", ", ", "unknown"])
def test_garbled_hop_stops_at_the_nearest_clear_address(header: str) -> None:
    assert BEHIND_LB.resolve("10.0.0.5", [header]) == "10.0.0.5"


def test_garbled_hop_left_of_an_untrusted_one_does_not_matter() -> None:
    assert BEHIND_LB.resolve("10.0.0.5", ["garbage, 203.0.113.9"]) == "203.0.113.9"


def test_ports_and_brackets_are_tolerated() -> None:
    assert DEFAULT.resolve("127.0.0.1", ["203.0.113.9:4711"]) == "203.0.113.9"
    assert DEFAULT.resolve("127.0.0.1", ["[2001:db8::9]:4711"]) == "2001:db8::9"


def test_ipv4_mapped_peer_is_plain_ipv4() -> None:
    assert DEFAULT.resolve("::ffff:127.0.0.1", ["203.0.113.9"]) == "203.0.113.9"
    assert DEFAULT.resolve("::ffff:198.51.100.7") == "198.51.100.7"


def test_nobody_trusted() -> None:
    resolver = ClientIpResolver(parse_networks("none", "test"))
    assert resolver.resolve("127.0.0.1", ["203.0.113.9"]) == "127.0.0.1"


def test_non_ip_peer() -> None:
    assert DEFAULT.resolve(None, ["203.0.113.9"]) == ""
    assert DEFAULT.resolve("", []) == ""
