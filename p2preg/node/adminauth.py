"""The node's admin credential: who may preheat and read repository names in the status.

Owns `admin.token` in the node's data directory (a fresh random token written
0600 at every start, in a 0700 directory: only the node's user and root can
read it), or the operator's `admin_token_file` instead, and the check of an
`Authorization: Bearer …` header against it in constant time. Local processes
that may reach the loopback facade are not thereby admins: any pod on the
host can pull, but only the holder of this file can make the node fetch or
list what it holds. Sans-IO apart from reading and writing that one file; it
must not know HTTP frameworks.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from p2preg.core.hostfiles import read_secret_file, write_private
from p2preg.core.logs import register_secret

ADMIN_TOKEN_FILE = "admin.token"
ADMIN_TOKEN_ENV = "P2PREG_ADMIN_TOKEN_FILE"
# `p2preg status` / `preheat` look here when told nothing (the node's default data_dir).
DEFAULT_ADMIN_TOKEN_PATH = Path("/var/lib/p2preg") / ADMIN_TOKEN_FILE


class AdminAuth:
    """The one admin token; `allows` takes an `Authorization` header value (or None)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an admin token must not be empty")
        self._token = token.encode()

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)


def open_admin_auth(data_dir: Path, token_file: Path | None) -> AdminAuth:
    """Read `token_file` (ConfigError when unreadable, open to others, or empty),
    else write a new `<data_dir>/admin.token`; the token is registered with the
    log formatter so no log line can carry it."""
    if token_file is not None:
        token = read_secret_file(token_file, "admin_token_file")
    else:
        token = secrets.token_urlsafe(32)
        write_private(data_dir / ADMIN_TOKEN_FILE, token.encode() + b"\n")
    register_secret(token)
    return AdminAuth(token)


def read_admin_token(path: str | Path | None) -> str | None:
    """What `p2preg status` and `preheat` send: the token in `path`, else in
    $P2PREG_ADMIN_TOKEN_FILE, else in the default node's data directory if
    this user may read it; None when none of these exists."""
    if path is None:
        path = os.environ.get(ADMIN_TOKEN_ENV) or None
    if path is None:
        if not os.access(DEFAULT_ADMIN_TOKEN_PATH, os.R_OK):
            return None
        path = DEFAULT_ADMIN_TOKEN_PATH
    return read_secret_file(Path(path), "admin token file", check_mode=False)


def admin_headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}
