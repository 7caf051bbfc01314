"""TLS from a cert-manager style directory: checked files, ssl contexts, reloading.

Owns reading a tls_dir (`tls.crt`, `tls.key`, `ca.crt`), refusing it at start
with a message that names the file and the reason (never a key's bytes), the
`ssl.SSLContext`s built from it (a server that requires a client certificate
from the cluster CA; a client that shows its certificate and verifies the
server), and a `ReloadingTLS` that notices renewed files and hands out fresh
contexts without a restart. It must not open sockets, choose who may do what
with an identity, or import any I/O library beyond the standard `ssl`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2preg.core.config import ConfigError
from p2preg.core.metainfo import issuing_root
from p2preg.core.pki import (
    CertificateError,
    Identity,
    check_key_pair,
    check_usage,
    identity_of_der,
    load_certificates,
    verify_chain,
)

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
# TLS 1.2 suites only (1.3's are fixed and all good): forward secret, AEAD.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
# A renewed file is noticed within this long; checking costs three stat calls.
DEFAULT_CHECK_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The three paths of a tls_dir; libtorrent takes paths, not contexts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def in_dir(cls, tls_dir: Path) -> TLSFiles:
        return cls(tls_dir / CERT_FILE, tls_dir / KEY_FILE, tls_dir / CA_FILE)

    def all(self) -> tuple[Path, Path, Path]:
        return (self.cert, self.key, self.ca)


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """A checked tls_dir: the bytes read, the identity they carry, when it expires."""

    files: TLSFiles
    identity: Identity
    not_after: dt.datetime
    cert_pem: bytes
    ca_pem: bytes
    key_pem: bytes = field(repr=False)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None


def _checked(files: TLSFiles, cert: bytes, key: bytes, ca: bytes, now: dt.datetime) -> Identity:
    """Each check names the file it blames; messages come from pki, never key bytes."""
    try:
        load_certificates(ca, "CA certificate")
    except CertificateError as e:
        raise ConfigError(f"{files.ca}: {e}") from None
    try:
        identity = verify_chain(cert, ca, now=now)
        check_usage(cert)
    except CertificateError as e:
        raise ConfigError(f"{files.cert}: {e}") from None
    try:
        check_key_pair(cert, key, what="the key")
    except CertificateError as e:
        raise ConfigError(f"{files.key}: {e}") from None
    return identity


def load_tls_dir(
    tls_dir: Path, *, role: str | None = None, now: dt.datetime | None = None
) -> TLSMaterial:
    """Read and check a tls_dir; `role` (`node`, `tracker`) is the identity it must carry."""
    if not tls_dir.is_dir():
        raise ConfigError(f"tls_dir {tls_dir}: not a directory")
    files = TLSFiles.in_dir(tls_dir)
    cert, key, ca = (_read(p) for p in files.all())
    when = now if now is not None else dt.datetime.now(dt.UTC)
    identity = _checked(files, cert, key, ca, when)
    if role is not None and identity.role != role:
        raise ConfigError(
            f"{files.cert}: a {identity.role} certificate ({identity}); this {role} needs a "
            f"{role} certificate"
        )
    not_after = load_certificates(cert, "certificate")[0].not_valid_after_utc
    return TLSMaterial(files, identity, not_after, cert, ca, key)


def _base_context(purpose: int, material: TLSMaterial) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Only the cluster CA(s) from ca.crt, never the system store: a public CA's
    # certificate must not pass for a cluster member.
    ctx.load_verify_locations(cadata=material.ca_pem.decode("ascii", "replace"))
    # ssl takes the chain and key as paths only; `_build` compares the files
    # with the checked bytes afterwards. The empty password keeps OpenSSL from
    # prompting on a terminal if an encrypted key slipped in after the check.
    ctx.load_cert_chain(material.files.cert, material.files.key, password=b"")
    return ctx


def server_context(material: TLSMaterial) -> ssl.SSLContext:
    """For the tracker: TLS 1.2+, and a client certificate from ca.crt is required."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, material)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def client_context(material: TLSMaterial, *, check_hostname: bool = True) -> ssl.SSLContext:
    """For a node's client to the tracker: shows tls.crt, verifies the server against ca.crt.

    The hostname check needs the tracker's name or address among its extra SANs
    (`p2preg ca issue --tracker NAME --dns HOST`): the `*` SAN every certificate
    carries matches no hostname in OpenSSL, so a node's certificate cannot pass
    for the tracker's by name. Callers still check the peer's role.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, material)
    ctx.check_hostname = check_hostname
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The identity of the peer's (verified) certificate on a finished handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise CertificateError("the peer sent no certificate")
    return identity_of_der(der)


def _stamp(files: TLSFiles) -> tuple[tuple[int, int, int, int], ...] | None:
    # stat follows symlinks, so cert-manager's atomic `..data` swap changes the inode.
    try:
        stats = [os.stat(p) for p in files.all()]
    except OSError:
        return None
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _build(tls_dir: Path, role: str | None) -> tuple[TLSMaterial, ssl.SSLContext, ssl.SSLContext]:
    """Checked material and both contexts, all from one version of the files.

    cert-manager swaps the three files at once, but three reads can straddle a
    swap: the contexts are rebuilt until the files read after building them are
    the bytes that were checked.
    """
    for _ in range(3):
        material = load_tls_dir(tls_dir, role=role)
        try:
            server, client = server_context(material), client_context(material)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls_dir {tls_dir}: cannot load it into TLS: {e}") from None
        f = material.files
        if (_read(f.cert), _read(f.key), _read(f.ca)) == (
            material.cert_pem,
            material.key_pem,
            material.ca_pem,
        ):
            return material, server, client
    raise ConfigError(f"tls_dir {tls_dir}: its files kept changing while being read")


class ReloadingTLS:
    """A tls_dir's contexts, rebuilt when its files change; the old ones until then.

    `server_context()` and `client_context()` are cheap: a clock read, and every
    `check_interval_s` three stat calls. A renewal that fails to load (a
    half-written file, another CA) keeps the previous contexts and is logged;
    connections already open keep theirs. `generation` grows with every reload,
    so a holder of paths (libtorrent) knows when to load them again. Safe to call
    from several threads. A server whose clients keep their connections open
    makes few handshakes: it calls `check()` on a timer too, so a renewed
    certificate (or a CA rotation's new root) is taken up without one.
    """

    def __init__(
        self,
        tls_dir: Path,
        *,
        role: str | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir, self._role = tls_dir, role
        self._interval, self._clock = check_interval_s, clock
        self._lock = threading.Lock()
        self._stamp = _stamp(TLSFiles.in_dir(tls_dir))
        self._refused: object = None  # the stamp of files last refused: warn once per version
        self._material, self._server, self._client = _build(tls_dir, role)
        self._next_check = clock() + check_interval_s
        self.generation = 0
        self._root: tuple[int, bytes | None] | None = None  # (generation, issuer_root)

    @property
    def files(self) -> TLSFiles:
        return self._material.files

    @property
    def material(self) -> TLSMaterial:
        self._maybe_reload()
        return self._material

    @property
    def identity(self) -> Identity:
        return self.material.identity

    def issuer_root(self) -> bytes | None:
        """The CA of ca.crt that issued tls.crt (canonical PEM), computed once per reload.

        In a CA rotation this is the side of the overlap the holder is on: a node
        roots its torrents there, the tracker prefers metainfo rooted there.
        """
        self._maybe_reload()
        with self._lock:  # the material and its generation, from one reload
            cached, material = self._root, self._material
            if cached is None or cached[0] != self.generation:
                root = issuing_root(material.cert_pem, material.ca_pem)
                cached = self._root = (self.generation, root)
            return cached[1]

    @property
    def check_interval_s(self) -> float:
        return self._interval

    def check(self) -> None:
        """Reload now if the files changed and the interval has passed."""
        self._maybe_reload()

    def server_context(self) -> ssl.SSLContext:
        self._maybe_reload()
        return self._server

    def client_context(self) -> ssl.SSLContext:
        self._maybe_reload()
        return self._client

    def _maybe_reload(self) -> None:
        if self._clock() < self._next_check:
            return
        with self._lock:
            now = self._clock()
            if now < self._next_check:
                return
            self._next_check = now + self._interval
            stamp = _stamp(TLSFiles.in_dir(self._dir))
            if stamp is None or stamp in (self._stamp, self._refused):
                return
            try:
                built = _build(self._dir, self._role)
            except ConfigError as e:
                self._refused = stamp
                log.warning("tls: renewed files not used, keeping the previous ones: %s", e)
                return
            self._stamp = stamp
            self._material, self._server, self._client = built
            self.generation += 1
            log.info(
                "tls: reloaded %s (%s, valid until %s)",
                self._dir,
                built[0].identity,
                f"{built[0].not_after:%F %T}Z",
            )
