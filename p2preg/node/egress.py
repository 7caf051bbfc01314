"""Where the upstream client may send registry credentials and follow redirects, sans-IO.

Owns the rules, as pure functions of URLs, that upstream.py asks before every
request that is not to the registry's own URL:

- basic credentials (to a token realm or to the registry itself) go only to
  the registry's own host or a realm host the operator listed in
  `trusted_realms` for that registry, and only over https; plain http only
  when both the registry and the target are on loopback (tests, a local seed);
- a redirect or a token realm on a loopback or link-local address (127/8, ::1,
  169.254/16, fe80::/10, `localhost`) is refused unless the registry itself is
  on such an address: a registry cannot point the node at its own metadata
  service or admin port; an https registry cannot move us to plain http;
- nothing follows a cross-host redirect with credentials (upstream.py drops
  `Authorization` when the origin changes; these rules refuse the rest).

Literal addresses and `localhost` names are checked here; a DNS name that
resolves to such an address is caught by upstream.py once connected (the
peer address), since resolving names here would be a second, racy lookup.
It must not perform I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10")
)
_LOOPBACK = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128"))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_localhost_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def is_local(host: str) -> bool:
    """Loopback or link-local, by literal address or by the `localhost` names."""
    addr = _address(host)
    if addr is None:
        return _is_localhost_name(host)
    return any(addr in net for net in LOCAL_NETWORKS)


def is_loopback(host: str) -> bool:
    addr = _address(host)
    if addr is None:
        return _is_localhost_name(host)
    return any(addr in net for net in _LOOPBACK)


@dataclass(frozen=True)
class Egress:
    """The rules for one seed registry at `registry_url`, trusting `trusted_realms` hosts."""

    registry_url: str
    trusted_realms: frozenset[str] = frozenset()

    @classmethod
    def of(cls, registry_url: str, trusted_realms: Iterable[str] = ()) -> Egress:
        return cls(registry_url, frozenset(h.lower() for h in trusted_realms))

    @property
    def registry_host(self) -> str:
        return (urlsplit(self.registry_url).hostname or "").lower()

    @property
    def registry_is_local(self) -> bool:
        return is_local(self.registry_host)

    def credentials_refusal(self, url: str) -> str | None:
        """Why basic credentials must not go to `url`; None when they may."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host != self.registry_host and host not in self.trusted_realms:
            return (
                f"{host or '?'} is neither the registry's host nor one of its trusted_realms"
            )
        if parts.scheme == "https":
            return None
        if parts.scheme == "http" and is_loopback(host) and is_loopback(self.registry_host):
            return None
        return f"{parts.scheme or '?'}://{host} is not https"

    def target_refusal(self, url: str) -> str | None:
        """Why a redirect or a token realm at `url` must not be followed; None when it may."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            return f"{url[:100]!r} is not an http(s) URL"
        if parts.scheme == "http" and urlsplit(self.registry_url).scheme == "https":
            return f"{host}: from an https registry to plain http"
        if is_local(host) and not self.registry_is_local:
            return f"{host} is a loopback or link-local address"
        return None

    def peer_refusal(self, peer_ip: str) -> str | None:
        """Why a connection that reached `peer_ip` (after a redirect) must be dropped."""
        if is_local(peer_ip) and not self.registry_is_local:
            return f"the redirect reached {peer_ip}, a loopback or link-local address"
        return None
