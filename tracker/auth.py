"""Who may ask: the cluster token, and whose `ip=` claims are believed.

`ClusterAuth` checks the one cluster token (in constant time) that announces,
scrapes and control requests carry, and decides which address a peer is
recorded under: the connection's, or the one it claims when the connection
comes from `trusted_ip_sources` (a reverse proxy). It is sans-IO: the token and
the address come from the caller, whatever the transport. It must not read
files (TrackerConfig.with_token resolved the token) or know requests.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from p2preg.core import errors


class ClusterAuth:
    def __init__(self, token: str | None, trusted_ip_sources: Iterable[str] = ()) -> None:
        self._token = None if token is None else token.encode()
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_ip_sources)

    def check(self, token: bytes | None) -> None:
        """Raise Unauthorized unless `token` is the cluster's (or the tracker has none)."""
        if self._token is None:
            return
        if token is None or not hmac.compare_digest(token, self._token):
            raise errors.Unauthorized("missing or wrong cluster token")

    def peer_ip(self, client_ip: str, claimed_ip: str | None) -> str:
        """The address a peer is handed out under."""
        if claimed_ip and self._trusted and self._is_trusted(client_ip):
            return claimed_ip
        return client_ip

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)
