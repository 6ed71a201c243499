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
# Not covered by is_global on every Python: the AWS IPv6 metadata endpoint.
_EXTRA_BLOCKED = (ipaddress.ip_network("fd00:ec2::/32"),)


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


def _blocked(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or any(addr in net for net in _EXTRA_BLOCKED)


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
