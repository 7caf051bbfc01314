"""The node's cluster identity as libtorrent's SSL torrents take it.

Owns what the swarm needs from a tls_dir: the root certificate the node's own
torrents name (the CA in ca.crt that issued tls.crt), every root it accepts in
metainfo from others (all CAs in ca.crt: two during a rotation), the paths it
hands to `torrent_handle.set_ssl_certificate`, and the Diffie-Hellman group file
libtorrent wants beside them (RFC 7919 ffdhe2048, written once into the data
dir: without a readable file libtorrent raises a torrent error on every SSL
torrent), and which port the session listens on with and without TLS
(`listen_interfaces`). It must not open sockets or touch a session; the swarm applies it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Protocol

from p2preg.core.config import ConfigError
from p2preg.core.metainfo import canonical_roots
from p2preg.core.tls import ReloadingTLS

DH_FILE = "ffdhe2048.pem"


def _floor_e_shifted(bits: int, guard: int = 64) -> int:
    """floor(e · 2**bits), from the series Σ 1/k! in integers (`guard` spare bits)."""
    scale = 1 << (bits + guard)
    total, term, k = 0, scale, 0
    while term:  # bounded: term shrinks by a factor k each step, ~300 steps here
        total += term
        k += 1
        term //= k
    return total >> guard


def ffdhe2048_prime() -> int:
    """RFC 7919's ffdhe2048 modulus, from its defining formula (generator 2)."""
    return 2**2048 - 2**1984 + (_floor_e_shifted(1918) + 560316) * 2**64 - 1


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading 0: positive
    return b"\x02" + _der_length(len(body)) + body


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def ffdhe2048_pem() -> bytes:
    """PKCS #3 `DHParameter ::= SEQUENCE { prime, base }`, PEM, as OpenSSL writes it."""
    body = _der_integer(ffdhe2048_prime()) + _der_integer(2)
    der = b"\x30" + _der_length(len(body)) + body
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    body_lines = b"\n".join(lines)
    return b"-----BEGIN DH PARAMETERS-----\n" + body_lines + b"\n-----END DH PARAMETERS-----\n"


def write_dh_params(data_dir: Path) -> Path:
    """Write the group file once (it is public); returns its path."""
    path = data_dir / DH_FILE
    pem = ffdhe2048_pem()
    if not path.is_file() or path.read_bytes() != pem:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        os.replace(tmp, path)
    return path


class TorrentRoots(Protocol):
    """Which root certificate the node's torrents name, and which it accepts in metainfo."""

    def root(self) -> bytes | None: ...

    def roots(self) -> tuple[bytes, ...]: ...


class PlainTorrents:
    """A node without a tls_dir: plain torrents, and no SSL torrent accepted."""

    def root(self) -> None:
        return None

    def roots(self) -> tuple[bytes, ...]:
        return ()


class PeerTLS:
    """A node's tls_dir as its SSL torrents use it; re-read when the files are renewed."""

    def __init__(self, tls: ReloadingTLS, data_dir: Path) -> None:
        self.tls = tls
        self.dh_params = write_dh_params(data_dir)
        self.root()  # refuse, at start, a tls.crt that no CA of ca.crt issued

    @property
    def generation(self) -> int:
        """Grows when renewed files were loaded: certificates must then be set again."""
        _ = self.tls.material  # reading it notices renewed files
        return self.tls.generation

    def roots(self) -> tuple[bytes, ...]:
        """Every CA of ca.crt, canonical PEM: an SSL torrent naming one of them is ours."""
        return canonical_roots([self.tls.material.ca_pem])

    def root(self) -> bytes:
        """The CA that issued tls.crt: the root certificate of the torrents this node makes."""
        root = self.tls.issuer_root()
        if root is None:
            files = self.tls.files
            raise ConfigError(f"{files.cert}: no CA in {files.ca} issued it")
        return root

    def apply(self, handle: Any) -> None:
        """Give one SSL torrent the node's certificate (libtorrent reads the files now)."""
        files = self.tls.files
        handle.set_ssl_certificate(str(files.cert), str(files.key), str(self.dh_params))


def listen_interfaces(host: str, port: int, ssl_port: int, *, tls: bool) -> str:
    """libtorrent's `listen_interfaces`: the plain port, or with TLS the SSL (`s`) port only.

    An SSL torrent takes peers on an SSL interface only, so a plain port under
    TLS would serve nothing of the cluster's: it is not opened.
    """
    address = f"[{host}]" if ":" in host else host
    return f"{address}:{ssl_port}s" if tls else f"{address}:{port}"
