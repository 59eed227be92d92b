"""The visitor's address: the peer, or what a trusted proxy says in X-Forwarded-For.

Only hops appended by proxies we trust are believed. Walking the header from
the right, each trusted hop vouches for the one to its left; the first hop
that is not a trusted proxy is the client. Anything left of it was written by
the client itself and may be forged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache
from socket import inet_aton

from gateway.config import IPNetwork
from gateway.params import CANONICAL_IPV4
from services.common.ip import normalize_ip

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Peers and forwarded hops repeat (a load balancer, keep-alive clients,
# returning visitors); parsing an address costs more than the rest of the lookup.
@lru_cache(maxsize=65536)
def _parse(text: str) -> IPAddress | None:
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        # "[v6]:port", as some proxies write it
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        # "v4:port"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# A dotted quad in its own normal form (CANONICAL_IPV4) is checked against the
# trusted networks as an integer (the common hop; ``ipaddress`` costs ~10 µs a hop).


class ClientIpResolver:
    def __init__(self, trusted_proxies: Iterable[IPNetwork]) -> None:
        self._trusted = tuple(trusted_proxies)
        self._trusted_v4 = tuple(
            (int(net.network_address), int(net.netmask)) for net in self._trusted if net.version == 4
        )
        self._is_trusted = lru_cache(maxsize=65536)(self._check_trusted)
        self._normalized = lru_cache(maxsize=65536)(self._normalize)

    def _check_trusted(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self._trusted)

    def _v4_trusted(self, canonical: str) -> bool:
        value = int.from_bytes(inet_aton(canonical), "big")
        return any(value & mask == network for network, mask in self._trusted_v4)

    def _peer_trusted(self, text: str) -> bool:
        address = _parse(text)
        return address is not None and self._is_trusted(address)

    @staticmethod
    def _normalize(text: str) -> str:
        # ``ipaddress`` finds the address in a hop ("[v6]:port", "v4:port") and
        # decides trust; the text passed on is the one canonical form every
        # layer uses (an address with a zone id, which no layer takes, is none).
        address = _parse(text)
        return (normalize_ip(str(address)) or "") if address is not None else ""

    def resolve(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str:
        """The client's address as text ("" when the peer is not an IP, e.g. a unix socket)."""
        if not peer:
            return ""
        if not forwarded_for or not self._trusted or not self._peer_trusted(peer):
            return self._normalized(peer)
        hops = (forwarded_for[0] if len(forwarded_for) == 1 else ",".join(forwarded_for)).split(",")
        nearest = peer
        for hop in reversed(hops):
            hop = hop.strip()
            if CANONICAL_IPV4.fullmatch(hop):
                if not self._v4_trusted(hop):
                    return hop
                nearest = hop
                continue
            address = _parse(hop)
            if address is None:
                # A garbled hop breaks the chain of trust: the last proxy that
                # spoke clearly is the best we can say.
                break
            nearest = hop
            if not self._is_trusted(address):
                break
        return self._normalized(nearest)
