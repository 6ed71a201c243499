"""Refusing webhook URLs that point into the operator's own network.

A webhook URL is chosen by whoever holds an admin token, but the request is
sent from inside the deployment: without this guard it could reach the cloud
metadata service, the database or an internal admin page. The host is resolved
and every address must be public (``ipaddress``'s ``is_global``, which also
excludes loopback, RFC 1918, link-local incl. 169.254.169.254, CGNAT,
multicast and reserved ranges). It is checked at registration and again at
each delivery, and the delivery connects to the address that was checked, so
a DNS answer that changes in between (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Not covered by is_global on every Python: the AWS IPv6 metadata endpoint; the
# local-use NAT64 prefix (RFC 8215: a gateway inside the network reaches any IPv4
# address through it, 169.254.169.254 included) and SIIT's IPv4-translated addresses
# (RFC 2765), neither of which is globally reachable.
_EXTRA_BLOCKED = (
    ipaddress.ip_network("fd00:ec2::/32"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::ffff:0:0:0/96"),
)
# IPv6 prefixes that carry an IPv4 address: judged by the address they reach.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class UnsafeUrl(ValueError):
    """The URL is malformed, or reaches an address webhooks may not call."""


def parse_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise UnsafeUrl("the URL must start with https:// or http://")
    if not parts.hostname:
        raise UnsafeUrl("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeUrl("credentials in the URL are not allowed; authenticate by signature")
    return parts


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a translation prefix routes to (mapped, 6to4, NAT64, compatible)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or addr in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _blocked(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return _blocked(inner)
        if addr.is_site_local:
            return True
    return (
        not addr.is_global
        or addr.is_multicast  # is_global is True for some multicast ranges
        or any(addr in net for net in _EXTRA_BLOCKED)
    )


async def resolve(url: str, *, allow_private: bool) -> list[IPAddress]:
    """The addresses ``url``'s host resolves to, all of them allowed; else :class:`UnsafeUrl`."""
    parts = parse_url(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"the host {host!r} does not resolve ({exc})") from None
    addrs: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise UnsafeUrl(f"the host {host!r} does not resolve")
    if not allow_private:
        bad = [a for a in addrs if _blocked(a)]
        if bad:
            raise UnsafeUrl(
                f"the host {host!r} resolves to a non-public address ({bad[0]}); "
                "webhooks may only call public addresses"
            )
    return addrs
