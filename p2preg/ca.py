"""`p2preg ca`: make a cluster CA and issue node and tracker certificates to files.

Owns the command line and the files: `ca init` writes `ca.crt` and `ca.key`;
`ca issue` writes the cert-manager layout (`tls.crt`, `tls.key`, `ca.crt`) that
a node or tracker reads as its tls_dir. Keys are created 0600 (never readable by
anyone else, not even for an instant) in a 0700 directory, each file replaced
atomically so a reloading reader sees the old file or the new one. The
certificates themselves come from `p2preg.core.pki`; this module must not
decide what they contain, nor serve anything.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from p2preg.core.config import ConfigError
from p2preg.core.pki import (
    CA_DAYS,
    DEFAULT_DAYS,
    Identity,
    Issued,
    ca_cluster,
    identity_of,
    issue,
    load_certificates,
    make_ca,
)
from p2preg.core.tls import CA_FILE, CERT_FILE, KEY_FILE

CA_KEY_FILE = "ca.key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="make a cluster CA: DIR/ca.crt and DIR/ca.key")
    init.add_argument("--cluster", required=True, help="cluster name (lowercase, e.g. prod-eu)")
    init.add_argument("--out", required=True, type=Path, help="directory for ca.crt, ca.key")
    init.add_argument("--days", default=str(CA_DAYS), help=f"CA lifetime in days ({CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    iss = sub.add_parser("issue", help="issue a node or tracker certificate: tls.crt, tls.key")
    iss.add_argument("--ca", required=True, type=Path, help="directory of ca.crt and ca.key")
    iss.add_argument("--node", metavar="NAME", help="a node certificate for NAME")
    iss.add_argument("--tracker", metavar="NAME", help="a tracker certificate for NAME")
    iss.add_argument(
        "--cluster", help="cluster name, for a CA made elsewhere (default: the CA's name)"
    )
    iss.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    iss.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    iss.add_argument("--days", default=str(DEFAULT_DAYS), help=f"lifetime ({DEFAULT_DAYS})")
    iss.add_argument("--out", required=True, type=Path, help="directory for the three files")


def _days(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--days takes a whole number of days ≥ 1, got {text!r}")
    return int(text)


def _private_dir(path: Path) -> None:
    """Create `path` 0700, or accept it if nobody else can enter it already."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create it: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path} is open to others (mode {mode:04o}); give a new directory or chmod 700 it"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write then rename: a reader sees the whole old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed a certificate's mode
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write it: {e.strerror}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None


def run_init(args: argparse.Namespace) -> int:
    days = _days(args.days)
    out: Path = args.out
    existing = [p for p in (out / CA_FILE, out / CA_KEY_FILE) if p.exists()]
    if existing and not args.force:
        raise ConfigError(
            f"{existing[0]} exists; --force replaces the CA, which changes every torrent's "
            "info-hash and invalidates every certificate it issued"
        )
    ca = make_ca(args.cluster, days=days)
    _private_dir(out)
    _write(out / CA_KEY_FILE, ca.key_pem, 0o600)
    _write(out / CA_FILE, ca.cert_pem, 0o644)
    until = load_certificates(ca.cert_pem, "CA certificate")[0].not_valid_after_utc
    print(f"cluster CA {args.cluster!r}: {out / CA_FILE}, {out / CA_KEY_FILE} (until {until:%F})")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    if (args.node is None) == (args.tracker is None):
        raise ConfigError("give exactly one of --node NAME or --tracker NAME")
    days = _days(args.days)
    ca_dir: Path = args.ca
    out: Path = args.out
    if out.resolve() == ca_dir.resolve():
        raise ConfigError("--out must not be the CA's directory: it would hand out ca.key")
    ca = Issued(_read(ca_dir / CA_FILE), _read(ca_dir / CA_KEY_FILE))
    cluster = args.cluster or ca_cluster(ca.cert_pem)
    role, name = ("node", args.node) if args.node is not None else ("tracker", args.tracker)
    cert = issue(ca, Identity(cluster, role, name), dns=args.dns, ips=args.ip, days=days)
    _private_dir(out)
    # CA first, then key, then certificate: a reloading reader refuses the
    # in-between state (key not matching the certificate) and keeps its old pair.
    _write(out / CA_FILE, load_ca_only(ca.cert_pem), 0o644)
    _write(out / KEY_FILE, cert.key_pem, 0o600)
    _write(out / CERT_FILE, cert.cert_pem, 0o644)
    until = load_certificates(cert.cert_pem, "certificate")[0].not_valid_after_utc
    print(
        f"{identity_of(cert.cert_pem)}: {out} (tls.crt, tls.key, ca.crt; until {until:%F %H:%M}Z)"
    )
    return 0


def load_ca_only(ca_pem: bytes) -> bytes:
    """ca.crt as handed to members: the CA certificate(s) checked, nothing else of the file."""
    certs = load_certificates(ca_pem, "CA certificate")
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def run(args: argparse.Namespace) -> int:
    if args.ca_command == "init":
        return run_init(args)
    return run_issue(args)
