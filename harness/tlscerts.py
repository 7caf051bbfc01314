"""Certificates for tests, benchmarks and the demo: a cluster CA and tls_dirs from it.

Owns writing the cert-manager layout (`tls.crt`, `tls.key`, `ca.crt`) that a
node or tracker reads with `--tls-dir`, from a CA made in memory, with keys
0600 in 0700 directories as `p2preg ca issue` writes them. Also makes the
certificates an attacker would hold: another cluster's, an expired one; and a
test's TLS client from a node's tls_dir (an `ssl.SSLContext`, an httpx client)
that shows the node's certificate and trusts only the cluster CA. What a
certificate contains is `p2preg.core.pki`'s; this module only writes files.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from p2preg.core.pki import Identity, Issued, issue, make_ca
from p2preg.core.tls import CA_FILE, CERT_FILE, KEY_FILE, client_context, load_tls_dir


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class ClusterCA:
    """A cluster CA in memory; `tls_dir` writes an identity's three files."""

    cluster: str
    ca: Issued

    @classmethod
    def make(cls, cluster: str = "test", *, now: dt.datetime | None = None) -> ClusterCA:
        return cls(cluster, make_ca(cluster, now=now))

    @property
    def cert_pem(self) -> bytes:
        return self.ca.cert_pem

    def issue(
        self,
        role: str,
        name: str,
        *,
        days: int = 30,
        now: dt.datetime | None = None,
        ips: Sequence[str] = (),
    ) -> Issued:
        identity = Identity(self.cluster, role, name)
        return issue(self.ca, identity, days=days, now=now, ips=ips)

    def tls_dir(
        self,
        out: Path,
        role: str,
        name: str,
        *,
        days: int = 30,
        now: dt.datetime | None = None,
        trust: bytes | None = None,
        ips: Sequence[str] = (),
    ) -> Path:
        """Write `out/{tls.crt,tls.key,ca.crt}` for `p2preg://cluster/role/name`.

        `trust` replaces what ca.crt holds (both CAs during a rotation, say);
        `ips` are extra IP SANs (a tracker's address, for the hostname check).
        """
        leaf = self.issue(role, name, days=days, now=now, ips=ips)
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(out / CERT_FILE, leaf.cert_pem, 0o644)
        _write(out / KEY_FILE, leaf.key_pem, 0o600)
        _write(out / CA_FILE, self.cert_pem if trust is None else trust, 0o644)
        return out


def expired_tls_dir(ca: ClusterCA, out: Path, role: str, name: str) -> Path:
    """A tls_dir whose certificate expired yesterday (issued 31 days ago for 30)."""
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=31)
    return ca.tls_dir(out, role, name, days=30, now=then)


def client_ssl_context(tls_dir: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context showing `tls_dir`'s certificate and trusting only its ca.crt.

    Reads the files without checking their dates, so a test can hold an
    expired certificate out to a server and watch it refused.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=tls_dir / CA_FILE)
    ctx.load_cert_chain(tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    ctx.check_hostname = check_hostname
    return ctx


def node_context(tls_dir: Path) -> ssl.SSLContext:
    """The context a node builds from a valid tls_dir (p2preg.core.tls's own)."""
    return client_context(load_tls_dir(tls_dir, role="node"))


def https_client(tls_dir: Path | None, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client showing `tls_dir`'s certificate (None: none, trusting nothing)."""
    verify: ssl.SSLContext | bool = False
    if tls_dir is not None:
        verify = client_ssl_context(tls_dir)
    return httpx.AsyncClient(verify=verify, **kwargs)
