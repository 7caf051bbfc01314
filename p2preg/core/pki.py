"""The cluster PKI: a cluster CA, the certificates it issues, the identity they carry.

Owns the shape of a p2preg certificate (EC P-256; one URI SAN
`p2preg://<cluster>/<role>/<name>`, the one field the tracker reads; a DNS SAN `*`
because libtorrent's SSL torrents refuse a peer whose DNS SAN matches neither the
torrent name nor `*`; extra DNS/IP SANs on request; usable as TLS server and
client), reading the identity back, and checking a chain against a CA, including
a CA the user brings (cert-manager). Pure functions over PEM bytes and a clock
value: it must not read or write files, open sockets or log.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2preg.core.config import ConfigError

SCHEME = "p2preg"
ROLES = ("node", "tracker")
# Short lifetimes are the revocation story (no CRL, no OCSP): a stolen node key
# is good for at most this long, and renewal is a routine, automated event.
DEFAULT_DAYS = 30
# The CA is long-lived on purpose: it is every SSL torrent's root certificate, so
# replacing it changes every info-hash and needs an overlap window in which both
# CAs are trusted. Five years makes that a planned event rather than a routine one,
# while still bounding how long a CA key that was never rotated stays useful.
CA_DAYS = 5 * 365
# Issued certificates start a little in the past so a peer whose clock runs
# slightly behind the issuer's does not refuse a fresh certificate.
BACKDATE = dt.timedelta(minutes=5)

# The cluster is the URI's authority: a lowercase DNS-style label sequence, so the
# same cluster cannot be spelt two ways. Names are node names (`host:5000` by
# default) or tracker names: URI path segments without `/`, `%` or spaces.
_CLUSTER_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}$")


_SIGNING_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class CertificateError(ConfigError):
    """A certificate, key or CA is unusable; the message says why, never a key's bytes."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate speaks for: `p2preg://<cluster>/<role>/<name>`."""

    cluster: str
    role: str
    name: str

    def __post_init__(self) -> None:
        if not _CLUSTER_RE.match(self.cluster):
            raise CertificateError(
                f"cluster name {self.cluster!r}: use lowercase letters, digits, '.' and '-'"
            )
        if self.role not in ROLES:
            raise CertificateError(f"role {self.role!r}: expected one of {', '.join(ROLES)}")
        if not _NAME_RE.match(self.name):
            raise CertificateError(
                f"name {self.name!r}: use letters, digits and . _ : @ - (at most 253)"
            )

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.cluster}/{self.role}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        prefix = f"{SCHEME}://"
        parts = uri[len(prefix) :].split("/") if uri.startswith(prefix) else []
        if len(parts) != 3:
            raise CertificateError(f"URI SAN {uri!r} is not {prefix}<cluster>/<role>/<name>")
        return cls(*parts)

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM. The key never shows in a repr."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _utcnow(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits keeps it so.
    return secrets.randbits(159) | 1


def make_ca(cluster: str, *, days: int = CA_DAYS, now: dt.datetime | None = None) -> Issued:
    """A self-signed cluster CA named after `cluster`, allowed to sign leaves only."""
    Identity(cluster, "node", "x")  # validates the cluster name the same way
    if days < 1:
        raise CertificateError("a CA lifetime must be at least 1 day")
    start = _utcnow(now) - BACKDATE
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SCHEME),
            x509.NameAttribute(NameOID.COMMON_NAME, cluster),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(start)
        .not_valid_after(start + BACKDATE + dt.timedelta(days=days))
        # path_length 0: the CA signs node and tracker certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; `what` names it in errors."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateError(f"{what}: not a PEM certificate") from None
    if not certs:
        raise CertificateError(f"{what}: no certificate in it")
    return certs


def load_private_key(pem: bytes, what: str) -> CertificateIssuerPrivateKeyTypes:
    """A PEM private key that can sign; the error never quotes the file's bytes."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CertificateError(f"{what}: the key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{what}: not a PEM private key") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise CertificateError(f"{what}: a {type(key).__name__} cannot sign certificates")
    return key


def ca_cluster(ca_cert_pem: bytes) -> str:
    """The cluster a p2preg CA was made for (its common name)."""
    ca = load_certificates(ca_cert_pem, "CA certificate")[0]
    names = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cluster = str(names[0].value) if names else ""
    if not _CLUSTER_RE.match(cluster):
        raise CertificateError(
            f"CA certificate: common name {cluster!r} is not a cluster name; "
            "a CA made elsewhere issues its own certificates (cert-manager)"
        )
    return cluster


def _leaf_extensions(
    builder: x509.CertificateBuilder, identity: Identity, dns: Sequence[str], ips: Sequence[str]
) -> x509.CertificateBuilder:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dict.fromkeys(("*", *dns))]
    for ip in dict.fromkeys(ips):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"--ip {ip!r} is not an IP address") from None
    usage = x509.KeyUsage(
        digital_signature=True,  # (EC)DHE handshakes sign with the key, as server or client
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        # A node is a TLS server to its peers and a client to the tracker.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )


_DNS_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*$")


def issue(
    ca: Issued,
    identity: Identity,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
) -> Issued:
    """A fresh key and a certificate for `identity`, signed by `ca`.

    Refused when the certificate would outlive the CA: a chain check would fail
    on that day anyway, long after anyone remembers why.
    """
    ca_cert = load_certificates(ca.cert_pem, "CA certificate")[0]
    ca_key = load_private_key(ca.key_pem, "CA key")
    if not _same_key(ca_cert, ca_key):
        raise CertificateError("CA key does not belong to the CA certificate")
    for d in dns:
        if d != "*" and (not _DNS_RE.match(d) or len(d) > 253):
            raise CertificateError(f"--dns {d!r} is not a DNS name")
    if days < 1:
        raise CertificateError("a certificate lifetime must be at least 1 day")
    start = _utcnow(now) - BACKDATE
    end = start + BACKDATE + dt.timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        raise CertificateError(
            f"a {days}-day certificate would outlive the CA, which expires "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}; use fewer --days or a new CA"
        )
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster)]
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role))
    if len(identity.name) <= 64:  # the X.520 upper bound of a common name
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, identity.name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    cert = _leaf_extensions(builder, identity, dns, ips).sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The identity in a certificate's one `p2preg://` URI SAN; anything else is refused."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("certificate has no subject alternative names") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    ours = [u for u in uris if u.lower().startswith(f"{SCHEME}://")]
    if len(ours) != 1:
        raise CertificateError(
            f"certificate carries {len(ours)} {SCHEME}:// URI SANs; exactly one names its identity"
        )
    return Identity.from_uri(ours[0])


def identity_of(cert_pem: bytes) -> Identity:
    """The identity of the first (leaf) certificate of a PEM bundle."""
    return identity_from_certificate(load_certificates(cert_pem, "certificate")[0])


def identity_of_der(cert_der: bytes) -> Identity:
    """The identity of a DER certificate, as `SSLSocket.getpeercert(binary_form=True)` gives it."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise CertificateError("peer certificate: not a DER certificate") from None
    return identity_from_certificate(cert)


def _same_key(cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    mine = key.public_key().public_bytes(der, spki)
    return bool(cert.public_key().public_bytes(der, spki) == mine)


def check_key_pair(cert_pem: bytes, key_pem: bytes, *, what: str = "key") -> None:
    """Refuse a private key that does not belong to the bundle's first certificate."""
    cert = load_certificates(cert_pem, "certificate")[0]
    if not _same_key(cert, load_private_key(key_pem, what)):
        raise CertificateError(f"{what} does not belong to the certificate")


def _check_time(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{what} is not valid before {cert.not_valid_before_utc:%F %T}Z")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{what} expired {cert.not_valid_after_utc:%F %T}Z")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# What each role does with its certificate: a node serves peers and is a client
# of the tracker; the tracker serves. A certificate without the extension may do
# anything (RFC 5280), which a user's CA is free to rely on.
_SERVER = (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
_CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
_ROLE_USAGES = {"node": (_SERVER, _CLIENT), "tracker": (_SERVER,)}


def check_usage(cert_pem: bytes) -> None:
    """Refuse a leaf that is a CA, or whose extended key usage does not fit its role.

    OpenSSL would refuse either at the handshake ("unsupported certificate
    purpose"); saying so at start names the problem.
    """
    cert = load_certificates(cert_pem, "certificate")[0]
    identity = identity_from_certificate(cert)
    if _is_ca(cert):
        raise CertificateError("certificate is a CA certificate, not a member's")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    missing = [name for oid, name in _ROLE_USAGES[identity.role] if oid not in eku]
    if missing:
        raise CertificateError(
            f"a {identity.role} certificate needs extended key usage {', '.join(missing)}"
        )


def verify_chain(cert_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None) -> Identity:
    """Check that the bundle's leaf chains to a CA in `ca_pem` and is valid now.

    `cert_pem` is the leaf, then any intermediates (cert-manager's tls.crt);
    `ca_pem` holds one or more trusted CAs (two during a CA rotation). Returns the
    leaf's identity. The TLS handshake checks the chain again; this check exists
    to fail at start, naming what is wrong, instead of at the first handshake.
    """
    when = _utcnow(now)
    chain = load_certificates(cert_pem, "certificate")
    anchors = load_certificates(ca_pem, "CA certificate")
    identity = identity_from_certificate(chain[0])
    _check_time(chain[0], "certificate", when)
    for i, cert in enumerate(chain):
        anchor = next((a for a in anchors if _issued_by(cert, a)), None)
        if anchor is not None:
            _check_time(anchor, "CA certificate", when)
            return identity
        if i + 1 < len(chain):
            parent = chain[i + 1]
            if not (_is_ca(parent) and _issued_by(cert, parent)):
                raise CertificateError(
                    f"certificate bundle: entry {i + 2} did not issue entry {i + 1}"
                )
            _check_time(parent, f"intermediate certificate {i + 2}", when)
    raise CertificateError(
        f"certificate ({chain[0].issuer.rfc4514_string()}) is not signed by the given CA "
        f"({', '.join(a.subject.rfc4514_string() for a in anchors)})"
    )
