"""The cluster's torrent rules as pure functions, and the parsed metainfo type.

Owns what makes metainfo deterministic: one file named after the digest
(`info_name`) and a piece size that is a function of the blob size only
(`piece_size_for`), and for a TLS cluster the CA every torrent names as its
root certificate, in one canonical form (`canonical_roots`). Making and
checking bencoded metainfo needs libtorrent and lives in `tracker.metainfo`;
this module imports no I/O library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from p2preg.core.digest import Digest
from p2preg.core.pki import CertificateError, load_certificates, verify_chain

KiB = 1024
MiB = 1024 * KiB
# Bounds of the piece-size rule. BEP 52 needs a power of two ≥ 16 KiB; 64 KiB
# keeps per-piece overhead small for config-sized blobs, 16 MiB keeps a piece
# cheap to re-fetch when one peer sends garbage.
MIN_PIECE_BYTES = 64 * KiB
MAX_PIECE_BYTES = 16 * MiB
# About this many pieces per blob: 100 MB gets 1 MiB pieces, the size measured
# fastest on loopback swarms (DESIGN.md, "Pitfalls").
TARGET_PIECES = 128

class MetainfoError(ValueError):
    """Metainfo does not decode or breaks the cluster's torrent rules; says which."""


class MetainfoTooLarge(MetainfoError):
    """Metainfo is larger than the configured limit."""


def piece_size_for(size: int) -> int:
    """The piece size every node uses for a blob of `size` bytes."""
    if size <= 0:
        raise MetainfoError("a blob of 0 bytes has no torrent")
    wanted = -(-size // TARGET_PIECES)  # ceiling division
    piece = 1 << max(0, wanted - 1).bit_length()
    return min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, piece))


# Chunk torrents (docs/SWARM.md, "Chunk swarms"): a blob is cut into at most
# this many (a 16 GiB blob in 4 MiB chunks), which the tracker enforces and the
# holder respects.
MAX_CHUNKS = 4096


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many chunks a `size`-byte blob cut every `chunk_bytes` makes."""
    return -(-size // chunk_bytes)


def chunk_length(size: int, chunk_bytes: int, index: int) -> int:
    """The length of chunk `index` of a `size`-byte blob cut every `chunk_bytes`."""
    return min(chunk_bytes, size - index * chunk_bytes)


def canonical_roots(pems: Iterable[bytes]) -> tuple[bytes, ...]:
    """Every certificate in these PEM bundles, each re-encoded as canonical PEM.

    The same CA can be written out with other line breaks or comments (a
    user's ca.crt, cert-manager's); its DER, and so this PEM, is one. That is
    what keeps an SSL torrent's bytes the same on every node of a cluster.
    """
    out: dict[bytes, None] = {}
    for pem in pems:
        try:
            certs = load_certificates(pem, "root certificate")
        except CertificateError as e:
            raise MetainfoError(str(e)) from None
        for cert in certs:
            out[cert.public_bytes(Encoding.PEM)] = None
    return tuple(out)


def issuing_root(cert_pem: bytes, ca_pem: bytes) -> bytes | None:
    """The CA of the `ca_pem` bundle (canonical PEM) that issued `cert_pem`'s leaf, or None.

    That CA is the root certificate of the torrents a member makes, and the
    tracker's "current root" during a CA rotation: the one its own certificate
    was issued by.
    """
    try:
        cas = canonical_roots([ca_pem])
    except MetainfoError:
        return None
    for ca in cas:
        try:
            verify_chain(cert_pem, ca)
        except CertificateError:
            continue
        return ca
    return None


def info_name(digest: Digest) -> str:
    """The torrent's name: `sha256-<hex>`, a valid file name on every platform."""
    return f"{digest.algorithm}-{digest.hex}"


@dataclass(frozen=True, slots=True)
class Metainfo:
    """Bencoded metainfo (`data`) with the facts read from it."""

    data: bytes
    digest: Digest
    size: int
    piece_size: int
    info_hash_v1: bytes | None  # 20-byte SHA-1, hybrid torrents only
    info_hash_v2: bytes  # 32-byte SHA-256
    # The CA (canonical PEM) that an SSL torrent's peers must chain to (its
    # `ssl-cert`), or None for a plain torrent.
    root_cert: bytes | None = None
    # SHA-256 of the info dictionary without `ssl-cert`: equal for the torrents
    # of the same bytes under any root, and only for those (the pieces root, and
    # a hybrid's v1 pieces, are in it).
    content_hash: bytes = b""

    @property
    def swarm_keys(self) -> tuple[bytes, ...]:
        """The 20-byte info-hashes peers announce under (v2 is truncated, BEP 52)."""
        keys = (self.info_hash_v2[:20],)
        return keys if self.info_hash_v1 is None else (self.info_hash_v1, *keys)
