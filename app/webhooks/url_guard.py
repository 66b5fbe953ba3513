"""Where a webhook may point: an http(s) URL without credentials whose host resolves only to public
addresses, checked when it is registered and again before every attempt (a name may resolve elsewhere by
then: DNS rebinding), unless the operator allows private addresses (PHITUNE_WEBHOOK_ALLOW_PRIVATE_URLS).

Host names and every spelling of an address (`0x7f000001`, `2130706433`, `127.1`, `[::ffff:127.0.0.1]`)
go through the system resolver, which reads the numeric forms as the C library does when it connects, so
what is checked is what would be reached."""

from __future__ import annotations

import ipaddress
import re
import socket

import httpx

SCHEMES = ("http", "https")
# What a host may be made of once IDNA-encoded: names and IPv4 spellings, and IPv6 literals (no zone ids).
HOST_CHARS = re.compile(r"[A-Za-z0-9.\-:]+")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64's well-known prefix (RFC 6052): a gateway reaches the IPv4 address in its last 32 bits, a private one
# too, while newer Pythons count the whole prefix as global (ipaddress follows IANA's registry).
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UrlRefused(ValueError):
    """A URL a webhook may not use, and why."""


def parse(url: str) -> httpx.URL:
    """The URL as httpx will send to it, if it is an absolute http(s) URL without credentials."""
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise UrlRefused("the URL holds spaces or control characters")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as error:
        raise UrlRefused(f"not a valid URL ({error})") from None
    if parsed.scheme not in SCHEMES:
        raise UrlRefused("the URL must start with http:// or https://")
    if parsed.userinfo:
        raise UrlRefused("the URL must not hold credentials (user:password@)")
    if not parsed.raw_host or not HOST_CHARS.fullmatch(parsed.raw_host.decode("ascii", "replace")):
        raise UrlRefused("the URL has no valid host")
    if port is not None and not 0 < port < 65536:
        raise UrlRefused("the URL's port is out of range")
    return parsed


def is_public(address: IPAddress) -> bool:
    """Whether an address is globally routable unicast; an IPv6 address that carries an IPv4 one (mapped,
    6to4, Teredo, NAT64) counts only if that one is public too."""
    if address.is_multicast or address.is_reserved or address.is_unspecified or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # fec0::/10, deprecated but still routed inside some networks
            return False
        nat64 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ()), nat64]
        return all(is_public(inner) for inner in embedded if inner is not None)
    return True


def resolve(url: httpx.URL) -> list[IPAddress]:
    """Every address the URL's host resolves to; UrlRefused when it resolves to none."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise UrlRefused(f"the host '{host}' does not resolve ({error})") from None
    # An IPv6 result may carry a zone ("fe80::1%eth0"): link-local either way.
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))


def public_addresses(url: httpx.URL) -> list[IPAddress]:
    """The URL's addresses, all public; UrlRefused if one is not."""
    addresses = resolve(url)
    for address in addresses:
        if not is_public(address):
            # Not which address: a tenant would learn what the API's network names resolve to.
            raise UrlRefused(
                f"the host '{url.host}' resolves to a loopback, private, link-local or otherwise non-public "
                "address"
            )
    return addresses


def check(url: str, *, allow_private: bool) -> httpx.URL:
    """The parsed URL, if a webhook may point at it now."""
    parsed = parse(url)
    if not allow_private:
        public_addresses(parsed)
    return parsed
