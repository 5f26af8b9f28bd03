"""Outgoing HTTP to URLs a client gave us (reference audio, webhooks) without SSRF: the host is
resolved and every address checked before a connection opens, and the connection is pinned to a
checked address, so DNS cannot answer differently in between."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Mapping

import httpx

from .errors import InvalidRequest

ResolveHost = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_blocked_address(ip: IPAddress) -> bool:
    """True for anything that is not a plain public unicast address, IPv4 embedded in IPv6 included."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is just a.b.c.d on a dual-stack socket
            return is_blocked_address(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and is_blocked_address(embedded):
            return True
        if ip.is_site_local:
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None


async def pinned_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    field: str,
    allow_private: bool,
    resolve: ResolveHost = system_resolve,
    headers: Mapping[str, str] | None = None,
    advice: str = "use a public URL",
    **kwargs: object,
) -> httpx.Request:
    """Check the URL's host and build a request that connects to one checked address; InvalidRequest
    (naming `field`) for a bad URL, an unknown host or a non-public address (unless `allow_private`)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidRequest(f"{field} is not a valid URL", field=field) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequest(f"{field} must be an http(s) URL", field=field)
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets
    if not host:
        raise InvalidRequest(f"{field} URL has no host", field=field)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = parse_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            resolved = await asyncio.to_thread(resolve, host, port)
        except (OSError, UnicodeError):
            resolved = []
        addresses = [ip for ip in map(parse_ip, resolved) if ip is not None]
        if not addresses:
            raise InvalidRequest(f"{field} URL host {host!r} could not be resolved", field=field)
    if not allow_private and any(is_blocked_address(ip) for ip in addresses):
        raise InvalidRequest(
            f"{field} URL points to a private, loopback or otherwise non-public address; {advice}",
            field=field,
        )
    host_header = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        host_header += f":{parsed.port}"
    pinned = parsed.copy_with(host=str(addresses[0]))
    extensions = {"sni_hostname": host} if parsed.scheme == "https" and literal is None else {}
    return client.build_request(
        method, pinned, headers={"Host": host_header, **(headers or {})}, extensions=extensions, **kwargs
    )
