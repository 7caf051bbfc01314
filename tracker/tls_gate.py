"""Who may talk to the tracker over mutual TLS, and what each refusal is called.

Owns the tracker's side of the cluster identity: the server context to wrap an
accepted connection in (fetched per connection from `ReloadingTLS`, so renewed
files take effect without a restart), the rule for a certificate that passed
the handshake (role `node`, or `tracker` for a replica's forwarded announces;
the tracker's own cluster), the small fixed set of
refusal reasons, the mapping of a failed handshake to one of them, counting
admitted handshakes (resumed or full), and counting and logging each refusal
(one INFO line per reason at most every LOG_EVERY_S, never a certificate's
bytes). It must not touch sockets or
streams (http_listener does) or decide what an admitted node may do
(http_routes and the coordinator do, with the identity it hands them).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from p2preg.core.pki import CertificateError, Identity
from p2preg.core.tls import ReloadingTLS, peer_identity

log = logging.getLogger("p2preg.tracker")

# The label values of p2preg_tracker_tls_refusals_total, all of them.
REFUSAL_REASONS = (
    "no_certificate",
    "unknown_ca",
    "expired",
    "bad_certificate",
    "bad_identity",
    "wrong_cluster",
    "wrong_role",
    "not_tls",
    "handshake_failed",
    "handshake_timeout",
)
# At most one log line per reason this often; the metric counts every one.
LOG_EVERY_S = 10.0
# OpenSSL's X509_V_ERR_* codes that have a reason of their own.
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "expired",  # not yet valid: a clock or a backdating problem, same remedy
    10: "expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
}


def handshake_refusal(error: BaseException | None) -> tuple[str, str]:
    """(reason, detail) for a failed server handshake; `error` is the ssl exception.

    The detail is OpenSSL's wording (e.g. "certificate has expired"), which names
    no key material; it goes to the log, never to the client.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(error.verify_code, "bad_certificate")
        return reason, str(error.verify_message)
    if isinstance(error, ssl.SSLError):
        why = str(error.reason or "")
        if why == "HTTP_REQUEST" or why == "WRONG_VERSION_NUMBER":
            return "not_tls", "a plain-text request on the TLS port"
        if why in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "no_certificate", "the client showed no certificate"
        if why:
            return "handshake_failed", why.lower().replace("_", " ")
    return "handshake_failed", "the connection ended during the handshake"


# Who may connect: nodes, and the other tracker replicas, which forward their
# nodes' announces (tracker/fronts.py) and may ask nothing else (http_routes).
ADMITTED_ROLES = ("node", "tracker")


def identity_refusal(identity: Identity, cluster: str) -> tuple[str, str] | None:
    """Why a verified certificate may not connect to the tracker, or None if it may."""
    if identity.cluster != cluster:
        return "wrong_cluster", f"{identity} is not of cluster {cluster!r}"
    if identity.role not in ADMITTED_ROLES:
        return "wrong_role", f"{identity} is not a node or tracker certificate"
    return None


class TLSGate:
    """The tracker's TLS: contexts, the admission rule, and the refusal tally."""

    def __init__(
        self,
        tls: ReloadingTLS,
        count: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        admitted: Callable[[bool], None] = lambda resumed: None,
    ) -> None:
        """`count` tallies a refusal by reason; `admitted` an admitted handshake,
        by whether it resumed a TLS session (a full one costs the tracker more)."""
        self._tls = tls
        self._count = count
        self._admitted = admitted
        self._clock = clock
        self.cluster = tls.identity.cluster
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def server_context(self) -> ssl.SSLContext:
        return self._tls.server_context()

    def admit(
        self, peer: ssl.SSLObject | ssl.SSLSocket
    ) -> tuple[Identity | None, tuple[str, str] | None]:
        """The identity on a finished handshake's (verified) peer certificate, or why not."""
        try:
            identity = peer_identity(peer)
        except CertificateError as e:
            return None, ("bad_identity", str(e))
        refusal = identity_refusal(identity, self.cluster)
        if refusal:
            return None, refusal
        self._admitted(bool(peer.session_reused))
        return identity, None

    def refused(self, reason: str, detail: str, ip: str) -> None:
        """Count a refusal; log it unless this reason was logged within LOG_EVERY_S."""
        self._count(reason)
        now = self._clock()
        last = self._last_logged.get(reason)
        if last is not None and now - last < LOG_EVERY_S:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        more = self._unlogged.pop(reason, 0)
        also = f" (and {more} more since the last such line)" if more else ""
        log.info("tls: refused %s: %s: %s%s", ip, reason, detail[:200], also)
