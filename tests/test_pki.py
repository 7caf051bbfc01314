"""p2preg.core.pki: the CA, the certificates it issues, the identity read back, chain checks."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2preg.core.config import ConfigError
from p2preg.core.pki import (
    CA_DAYS,
    CertificateError,
    Identity,
    Issued,
    ca_cluster,
    check_key_pair,
    check_usage,
    identity_of,
    identity_of_der,
    issue,
    make_ca,
    verify_chain,
)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("prod-eu", now=NOW)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_the_ca_is_a_p256_ca_named_after_the_cluster_that_signs_leaves_only(ca: Issued) -> None:
    cert = _cert(ca.cert_pem)
    assert ca_cluster(ca.cert_pem) == "prod-eu"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "prod-eu"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=CA_DAYS)
    cert.verify_directly_issued_by(cert)
    check_key_pair(ca.cert_pem, ca.key_pem)


def test_a_node_certificate_carries_exactly_the_sans_and_usages_promised(ca: Issued) -> None:
    node = issue(ca, Identity("prod-eu", "node", "host-1:5000"), now=NOW)
    cert = _cert(node.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.UniformResourceIdentifier("p2preg://prod-eu/node/host-1:5000"),
        x509.DNSName("*"),
    ]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.key_encipherment or ku.value.crl_sign)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=30)
    assert cert.not_valid_before_utc < NOW  # backdated for clock skew
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cert.verify_directly_issued_by(_cert(ca.cert_pem))
    check_key_pair(node.cert_pem, node.key_pem)
    assert b"PRIVATE" not in node.cert_pem and b"PRIVATE KEY" in node.key_pem
    assert "PRIVATE" not in repr(node)


def test_extra_sans_are_added_once_and_days_are_honoured(ca: Issued) -> None:
    t = issue(
        ca,
        Identity("prod-eu", "tracker", "t1"),
        dns=["tracker.p2preg.svc", "*", "tracker.p2preg.svc"],
        ips=["10.0.0.7", "::1"],
        days=7,
        now=NOW,
    )
    cert = _cert(t.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["*", "tracker.p2preg.svc"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "p2preg://prod-eu/tracker/t1"
    ]
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=7)


def test_identity_round_trips_through_pem_and_der(ca: Issued) -> None:
    who = Identity("prod-eu", "node", "n-7.example")
    issued = issue(ca, who, now=NOW)
    assert identity_of(issued.cert_pem) == who
    der = _cert(issued.cert_pem).public_bytes(serialization.Encoding.DER)
    assert identity_of_der(der) == who
    assert Identity.from_uri(who.uri) == who and str(who) == who.uri
    assert verify_chain(issued.cert_pem, ca.cert_pem, now=NOW) == who


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Prod", "node", "n"), "cluster name"),
        (("prod", "admin", "n"), "role 'admin'"),
        (("prod", "node", "a/b"), "name 'a/b'"),
        (("prod", "node", ""), "name ''"),
    ],
)
def test_a_bad_identity_is_refused(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        Identity(*args)


def _custom_leaf(
    ca: Issued, sans: list[x509.GeneralName], extra: x509.ExtensionType | None = None
) -> bytes:
    """A certificate the user's own CA might issue, with whatever SANs it likes."""
    ca_cert = _cert(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


def test_exactly_one_p2preg_uri_san_names_the_identity(ca: Issued) -> None:
    uri = x509.UniformResourceIdentifier
    with pytest.raises(CertificateError, match="no subject alternative names"):
        identity_of(_custom_leaf(ca, []))
    with pytest.raises(CertificateError, match="carries 0 p2preg:// URI SANs"):
        identity_of(_custom_leaf(ca, [x509.DNSName("*"), uri("spiffe://prod/node/a")]))
    two = [uri("p2preg://prod-eu/node/a"), uri("p2preg://prod-eu/tracker/b")]
    with pytest.raises(CertificateError, match="carries 2 p2preg:// URI SANs"):
        identity_of(_custom_leaf(ca, two))
    with pytest.raises(CertificateError, match="is not p2preg://<cluster>/<role>/<name>"):
        identity_of(_custom_leaf(ca, [uri("p2preg://prod-eu/node")]))
    # A user's CA may add URIs of its own (SPIFFE, say): only ours is read.
    mixed = [uri("spiffe://prod/ns/x"), uri("p2preg://prod-eu/node/a"), x509.DNSName("*")]
    assert identity_of(_custom_leaf(ca, mixed)) == Identity("prod-eu", "node", "a")


def test_another_cas_expired_or_premature_certificate_is_refused(ca: Issued) -> None:
    other = make_ca("prod-eu", now=NOW)
    theirs = issue(other, Identity("prod-eu", "node", "n"), now=NOW)
    with pytest.raises(CertificateError, match="is not signed by the given CA"):
        verify_chain(theirs.cert_pem, ca.cert_pem, now=NOW)
    # Either CA of a rotation's overlap window is trusted.
    assert verify_chain(theirs.cert_pem, ca.cert_pem + other.cert_pem, now=NOW).name == "n"
    ours = issue(ca, Identity("prod-eu", "node", "n"), days=1, now=NOW)
    with pytest.raises(CertificateError, match="expired 2026-06-02"):
        verify_chain(ours.cert_pem, ca.cert_pem, now=NOW + dt.timedelta(days=2))
    with pytest.raises(CertificateError, match="not valid before"):
        verify_chain(ours.cert_pem, ca.cert_pem, now=NOW - dt.timedelta(hours=1))


def test_a_chain_through_an_intermediate_is_accepted(ca: Issued) -> None:
    """cert-manager's tls.crt may hold the leaf and an intermediate; ca.crt the root."""
    root = _cert(ca.cert_pem)
    root_key = serialization.load_pem_private_key(ca.key_pem, None)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prod-eu")])
    mid = (
        x509.CertificateBuilder()
        .subject_name(mid_name)
        .issuer_name(root.subject)
        .public_key(mid_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    mid_pem = mid.public_bytes(serialization.Encoding.PEM)
    mid_issued = Issued(
        mid_pem,
        mid_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    leaf = issue(mid_issued, Identity("prod-eu", "node", "n"), now=NOW)
    assert verify_chain(leaf.cert_pem + mid_pem, ca.cert_pem, now=NOW).name == "n"
    with pytest.raises(CertificateError, match="not signed by the given CA"):
        verify_chain(leaf.cert_pem, ca.cert_pem, now=NOW)


def test_a_mismatched_key_and_bad_input_are_clear_errors(ca: Issued) -> None:
    a = issue(ca, Identity("prod-eu", "node", "a"), now=NOW)
    b = issue(ca, Identity("prod-eu", "node", "b"), now=NOW)
    with pytest.raises(CertificateError, match="does not belong to the certificate") as e:
        check_key_pair(a.cert_pem, b.key_pem)
    assert b.key_pem.decode().splitlines()[1] not in str(e.value)
    with pytest.raises(CertificateError, match="not a PEM private key"):
        check_key_pair(a.cert_pem, b"garbage")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        identity_of(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="CA key does not belong"):
        issue(Issued(ca.cert_pem, a.key_pem), Identity("prod-eu", "node", "c"), now=NOW)
    with pytest.raises(CertificateError, match="outlive the CA"):
        issue(ca, Identity("prod-eu", "node", "c"), days=CA_DAYS + 1, now=NOW)
    with pytest.raises(CertificateError, match=r"'10\.0\.0\.300' is not an IP"):
        issue(ca, Identity("prod-eu", "node", "c"), ips=["10.0.0.300"], now=NOW)
    with pytest.raises(CertificateError, match=r"'bad name' is not a DNS name"):
        issue(ca, Identity("prod-eu", "node", "c"), dns=["bad name"], now=NOW)
    assert issubclass(CertificateError, ConfigError)  # the CLI's one-line exit 2


def test_a_ca_or_a_certificate_unfit_for_its_role_is_refused(ca: Issued) -> None:
    check_usage(issue(ca, Identity("prod-eu", "node", "n"), now=NOW).cert_pem)
    uri = x509.UniformResourceIdentifier("p2preg://prod-eu/node/a")
    check_usage(_custom_leaf(ca, [uri]))  # no extended key usage: any use (RFC 5280)
    server_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(CertificateError, match=r"a node certificate needs .* clientAuth"):
        check_usage(_custom_leaf(ca, [uri], server_only))
    tracker = x509.UniformResourceIdentifier("p2preg://prod-eu/tracker/t")
    check_usage(_custom_leaf(ca, [tracker], server_only))
    as_ca = x509.BasicConstraints(ca=True, path_length=None)
    with pytest.raises(CertificateError, match="is a CA certificate, not a member's"):
        check_usage(_custom_leaf(ca, [uri], as_ca))
