"""Making and checking the cluster's bencoded metainfo for one verified blob.

Owns the torrent format built on `p2preg.core.metainfo`'s rules: the BEP 27
private flag, BitTorrent v2 (see docs/SWARM.md for why v2-only), no creation
date, creator, comment or tracker — so any two honest nodes make byte-identical
metainfo, and the same info-hash, for the same blob. In a TLS cluster the info
dictionary also holds `ssl-cert`, the cluster CA in canonical PEM (libtorrent's
SSL torrent: only peers with a certificate from it are let in), so metainfo is
deterministic per blob and CA. The tracker uses
`parse_metainfo` to refuse anything that does not follow these rules; nodes use
both. Bencoding and hashing are libtorrent's own. This module must not touch the
network or a session; its one file access is `make_metainfo` reading the blob it
is given (blocking: run it in a worker thread).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libtorrent as lt

from p2preg.core.digest import Digest
from p2preg.core.metainfo import (
    Metainfo,
    MetainfoError,
    MetainfoTooLarge,
    MiB,
    canonical_roots,
    info_name,
    piece_size_for,
)

# Keys an honest node's metainfo may hold. Anything else (trackers, comments,
# creation dates, a `source` tag) is node-specific or useless, and would let
# two nodes disagree about bytes that should be identical.
_TOP_LEVEL_KEYS = frozenset({b"info", b"piece layers"})
_V2_INFO_KEYS = frozenset({b"file tree", b"meta version", b"name", b"piece length", b"private"})
_HYBRID_INFO_KEYS = _V2_INFO_KEYS | {b"length", b"pieces"}
_SSL_CERT = b"ssl-cert"


def make_metainfo(
    path: Path, digest: Digest, size: int, *, hybrid: bool = False, root: bytes | None = None
) -> Metainfo:
    """Make the cluster's metainfo from `path`, which must hold the verified blob.

    Blocks while it hashes the file (about 0.2 s per 200 MB). `hybrid=True` adds
    v1 piece hashes; nodes don't use it (docs/SWARM.md), tests of hybrid swarms do.
    `root` (one CA certificate, PEM) makes it an SSL torrent rooted at that CA.
    """
    roots: tuple[bytes, ...] = ()
    if root is not None:
        roots = canonical_roots([root])
        if len(roots) != 1:
            raise MetainfoError(f"an SSL torrent has one root certificate, not {len(roots)}")
    piece = piece_size_for(size)
    name = info_name(digest)
    flags = 0 if hybrid else lt.create_torrent.v2_only
    ct = lt.create_torrent([lt.create_file_entry(name, size)], piece, flags=flags)
    ct.set_priv(True)
    if roots:
        ct.set_root_cert(roots[0].decode("ascii"))
    # libtorrent reads the file as <dir>/<name>; a symlink lets the blob keep
    # whatever name the store gives it.
    with tempfile.TemporaryDirectory(prefix="p2preg-metainfo-") as tmp:
        os.symlink(os.path.abspath(path), os.path.join(tmp, name))
        try:
            lt.set_piece_hashes(ct, tmp)
        except RuntimeError as e:
            raise MetainfoError(f"cannot hash {path}: {e}") from None
    entry: Any = ct.generate()
    entry.pop(b"creation date", None)
    data: bytes = lt.bencode(entry)
    return parse_metainfo(data, digest, size, roots=roots)


def parse_metainfo(
    data: bytes,
    digest: Digest,
    size: int,
    *,
    roots: Sequence[bytes] = (),
    max_bytes: int = 4 * MiB,
) -> Metainfo:
    """Check `data` is the cluster's metainfo for (`digest`, `size`); raise MetainfoError.

    `roots` are the CAs the cluster trusts (PEM, bundles allowed; two during a
    CA rotation): with none, an SSL torrent is refused; with some, only an SSL
    torrent whose `ssl-cert` is one of them, in canonical PEM, is accepted.
    """
    if len(data) > max_bytes:
        raise MetainfoTooLarge(f"metainfo is {len(data)} bytes, the limit is {max_bytes}")
    if size <= 0:
        raise MetainfoError("a blob of 0 bytes has no torrent")
    try:
        top: Any = lt.bdecode(data)
    except RuntimeError as e:
        raise MetainfoError(f"metainfo does not decode: {e}") from None
    if not isinstance(top, dict) or not isinstance(top.get(b"info"), dict):
        raise MetainfoError("metainfo is not a dictionary with an info dictionary")
    if lt.bencode(top) != data:
        # Trailing bytes or non-canonical encoding would give two byte strings
        # for one torrent.
        raise MetainfoError("metainfo is not canonically bencoded")
    extra = set(top) - _TOP_LEVEL_KEYS
    if extra:
        raise MetainfoError(f"metainfo has node-specific keys: {_names(extra)}")
    info: dict[bytes, object] = top[b"info"]
    if info.get(b"private") != 1:
        raise MetainfoError("metainfo is not private (BEP 27 flag missing)")
    if info.get(b"meta version") != 2:
        raise MetainfoError("metainfo is not BitTorrent v2 or hybrid")
    allowed = _HYBRID_INFO_KEYS if b"pieces" in info else _V2_INFO_KEYS
    extra = set(info) - allowed - {_SSL_CERT}
    if extra:
        raise MetainfoError(f"info dictionary has unexpected keys: {_names(extra)}")
    name = info_name(digest)
    if info.get(b"name") != name.encode():
        raise MetainfoError(f"metainfo name {_text(info.get(b'name'))} is not {name}")
    tree = info.get(b"file tree")
    if not isinstance(tree, dict) or list(tree) != [name.encode()]:
        raise MetainfoError(f"metainfo must hold exactly one file named {name}")
    leaf = tree[name.encode()]
    file_entry = leaf.get(b"") if isinstance(leaf, dict) else None
    if not isinstance(file_entry, dict) or file_entry.get(b"length") != size:
        raise MetainfoError(f"metainfo file length does not match the blob size {size}")
    if b"length" in info and info[b"length"] != size:
        raise MetainfoError(f"metainfo v1 length does not match the blob size {size}")
    expected_piece = piece_size_for(size)
    if info.get(b"piece length") != expected_piece:
        raise MetainfoError(
            f"piece length {info.get(b'piece length')!r} is not {expected_piece}, "
            f"the cluster's piece size for {size} bytes"
        )
    if size > expected_piece and not top.get(b"piece layers"):
        raise MetainfoError("metainfo lacks the v2 piece layers")
    root = _root_cert(info.get(_SSL_CERT), roots)
    try:
        # libtorrent checks the merkle structure: piece layers against the
        # pieces root, v1 piece count against the length.
        ti = lt.torrent_info(data)
    except RuntimeError as e:
        raise MetainfoError(f"metainfo is invalid: {e}") from None
    hashes = ti.info_hashes()
    if not hashes.has_v2() or not ti.priv():
        raise MetainfoError("metainfo is not a private v2 torrent")
    return Metainfo(
        data=data,
        digest=digest,
        size=size,
        piece_size=expected_piece,
        info_hash_v1=hashes.v1.to_bytes() if hashes.has_v1() else None,
        info_hash_v2=hashes.v2.to_bytes(),
        root_cert=root,
        content_hash=hashlib.sha256(lt.bencode(_without_root(info))).digest(),
    )


def _without_root(info: dict[bytes, object]) -> dict[bytes, Any]:
    """The info dictionary as it would be under any root: everything but `ssl-cert`."""
    return {k: v for k, v in info.items() if k != _SSL_CERT}


def _root_cert(ssl_cert: object, roots: Sequence[bytes]) -> bytes | None:
    """The torrent's root certificate, when it is one this cluster trusts; else why not."""
    if not roots:
        if ssl_cert is not None:
            raise MetainfoError(
                "metainfo is an SSL torrent (ssl-cert), but this cluster runs without TLS"
            )
        return None
    if ssl_cert is None:
        raise MetainfoError("metainfo has no ssl-cert; this cluster's torrents name its CA")
    if not isinstance(ssl_cert, bytes):
        raise MetainfoError("metainfo ssl-cert is not a string")
    trusted = canonical_roots(roots)
    try:
        (given,) = canonical_roots([ssl_cert])
    except (MetainfoError, ValueError):
        raise MetainfoError("metainfo ssl-cert is not one PEM certificate") from None
    if given not in trusted:
        raise MetainfoError("metainfo ssl-cert is not a CA this cluster trusts")
    if ssl_cert != given:
        # Another spelling of a trusted CA would give the same blob a second info-hash.
        raise MetainfoError("metainfo ssl-cert is not in canonical PEM form")
    return given


def _names(keys: set[bytes]) -> str:
    return ", ".join(sorted(k.decode("utf-8", "replace")[:40] for k in keys))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace")[:80])
    return repr(value)[:80]
