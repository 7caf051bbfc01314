"""SSL torrents in the cluster's metainfo (tracker/metainfo.py) and the node's roots (peertls.py).

`parse_metainfo` accepts exactly: no `ssl-cert` without roots; with roots, an
`ssl-cert` that is one of them in canonical PEM. Metainfo is deterministic per
blob and CA, whatever spelling of the CA a node's ca.crt holds. The node names
the CA that issued its certificate, and accepts any CA of ca.crt (a rotation).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from harness.tlscerts import ClusterCA
from p2preg.core.digest import Digest
from p2preg.core.metainfo import MetainfoError, canonical_roots
from p2preg.core.tls import ReloadingTLS
from p2preg.node.peertls import PeerTLS, ffdhe2048_pem, write_dh_params
from tracker.metainfo import make_metainfo, parse_metainfo


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, Digest, int]:
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, Digest.of(data), len(data)


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.make("meta")


def _respelt(pem: bytes) -> bytes:
    """The same certificate as another tool may write it: CRLF, a comment before it."""
    return b"subject=CN = meta\r\n" + pem.replace(b"\n", b"\r\n")


def _with_ssl_cert(data: bytes, value: Any) -> bytes:
    top = lt.bdecode(data)
    if value is None:
        del top[b"info"][b"ssl-cert"]
    else:
        top[b"info"][b"ssl-cert"] = value
    out: bytes = lt.bencode(top)
    return out


def test_metainfo_is_deterministic_per_blob_and_ca(
    blob: tuple[Path, Digest, int], ca: ClusterCA
) -> None:
    path, digest, size = blob
    a = make_metainfo(path, digest, size, root=ca.cert_pem)
    b = make_metainfo(path, digest, size, root=_respelt(ca.cert_pem))
    assert a.data == b.data and a.info_hash_v2 == b.info_hash_v2
    assert a.root_cert == canonical_roots([ca.cert_pem])[0]
    other = make_metainfo(path, digest, size, root=ClusterCA.make("meta").cert_pem)
    plain = make_metainfo(path, digest, size)
    assert len({a.info_hash_v2, other.info_hash_v2, plain.info_hash_v2}) == 3
    assert plain.root_cert is None


def test_parse_accepts_exactly_a_trusted_root(
    blob: tuple[Path, Digest, int], ca: ClusterCA
) -> None:
    path, digest, size = blob
    ssl = make_metainfo(path, digest, size, root=ca.cert_pem)
    plain = make_metainfo(path, digest, size)
    other_ca = ClusterCA.make("meta")
    # A roots bundle in another spelling, or with a second CA (a rotation), is fine.
    for roots in ([ca.cert_pem], [_respelt(ca.cert_pem)], [other_ca.cert_pem + ca.cert_pem]):
        assert parse_metainfo(ssl.data, digest, size, roots=roots) == ssl
    assert parse_metainfo(plain.data, digest, size) == plain
    refusals = [
        (ssl.data, (), "this cluster runs without TLS"),
        (plain.data, [ca.cert_pem], "has no ssl-cert"),
        (ssl.data, [other_ca.cert_pem], "not a CA this cluster trusts"),
        (_with_ssl_cert(ssl.data, _respelt(ca.cert_pem)), [ca.cert_pem], "canonical PEM"),
        (_with_ssl_cert(ssl.data, b"not a certificate"), [ca.cert_pem], "one PEM certificate"),
        (_with_ssl_cert(ssl.data, 7), [ca.cert_pem], "not a string"),
        (
            _with_ssl_cert(ssl.data, ca.cert_pem + other_ca.cert_pem),
            [ca.cert_pem, other_ca.cert_pem],
            "one PEM certificate",
        ),
    ]
    for data, roots, message in refusals:
        with pytest.raises(MetainfoError, match=message):
            parse_metainfo(data, digest, size, roots=roots)


def test_make_refuses_a_root_that_is_not_one_certificate(
    blob: tuple[Path, Digest, int], ca: ClusterCA
) -> None:
    path, digest, size = blob
    with pytest.raises(MetainfoError, match="one root certificate"):
        make_metainfo(path, digest, size, root=ca.cert_pem + ClusterCA.make("meta").cert_pem)
    with pytest.raises(MetainfoError, match="not a PEM certificate"):
        make_metainfo(path, digest, size, root=b"garbage")


def test_dh_params_are_rfc7919_ffdhe2048_as_openssl_writes_them(tmp_path: Path) -> None:
    out = subprocess.run(
        ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"],
        check=True, capture_output=True, timeout=30,
    ).stdout
    assert ffdhe2048_pem() == out
    path = write_dh_params(tmp_path)
    assert path.read_bytes() == out
    assert write_dh_params(tmp_path) == path


def test_the_node_names_the_ca_that_issued_its_certificate_and_accepts_both_in_a_rotation(
    tmp_path: Path, ca: ClusterCA
) -> None:
    new = ClusterCA.make("meta")
    both = ca.cert_pem + new.cert_pem
    old_node = PeerTLS(
        ReloadingTLS(ca.tls_dir(tmp_path / "old", "node", "n1", trust=both)), tmp_path / "d1"
    )
    new_node = PeerTLS(
        ReloadingTLS(new.tls_dir(tmp_path / "new", "node", "n2", trust=both)), tmp_path / "d2"
    )
    assert old_node.root() == canonical_roots([ca.cert_pem])[0]
    assert new_node.root() == canonical_roots([new.cert_pem])[0]
    assert old_node.roots() == new_node.roots() == canonical_roots([both])
