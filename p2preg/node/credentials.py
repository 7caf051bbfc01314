"""Registry credentials: the `credentials_file` and the rule for where they may go.

Owns reading the operator's credentials at start, from `credentials` settings
and from `credentials_file`, a TOML or JSON document mapping a registry name
(an upstream's `ns`) to `username` and `password`:

    ["registry.example.com"]
    username = "puller"
    password = "…"

The file must be the node user's alone (mode 0600 or 0400), every name a
configured upstream, no field empty; a registry whose credentials would cross
the network in clear (an http:// upstream not on loopback) is refused at start.
Every password is registered with the log formatter. Errors name the file and
the registry, never a value. It must not make a request.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from p2preg.core.config import ConfigError
from p2preg.core.hostfiles import check_secret_file
from p2preg.core.logs import register_secret
from p2preg.node.config import Credential, NodeConfig
from p2preg.node.egress import Egress


def _parse(path: Path, raw: bytes) -> object:
    try:
        if path.suffix == ".json":
            return json.loads(raw)
        return tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        # The parsers quote the offending text, which may be a password.
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"credentials_file {path} is not valid {kind}") from None


def read_credentials_file(path: Path) -> list[Credential]:
    """Every credential in `path` (ConfigError when open to others, malformed or empty)."""
    check_secret_file(path, "credentials_file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read credentials_file {path}: {e.strerror}") from None
    doc = _parse(path, raw)
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"credentials_file {path}: expected registry = {{username, password}}")
    out: list[Credential] = []
    for ns, entry in doc.items():
        if not isinstance(entry, dict) or set(entry) != {"username", "password"}:
            raise ConfigError(
                f"credentials_file {path}: {ns!r} must have exactly username and password"
            )
        user, password = entry["username"], entry["password"]
        if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
            raise ConfigError(f"credentials_file {path}: {ns!r} has an empty or non-text field")
        out.append(Credential(ns, user, password))
    return out


def node_credentials(config: NodeConfig) -> dict[str, Credential]:
    """The credential of each registry that has one, checked against the egress rules."""
    creds: dict[str, Credential] = {}
    for c in config.credentials:
        creds[c.ns] = c
    if config.credentials_file is not None:
        for c in read_credentials_file(config.credentials_file):
            if c.ns in creds:
                raise ConfigError(f"credentials for {c.ns!r} given twice")
            creds[c.ns] = c
    for ns, c in creds.items():
        upstream = config.upstream_for(ns)
        if upstream is None or upstream.ns != ns:
            raise ConfigError(f"credentials for {ns!r}, which is not a configured upstream")
        refusal = Egress.of(upstream.url).credentials_refusal(upstream.url)
        if refusal is not None:
            raise ConfigError(
                f"credentials for {ns!r} would cross the network in clear ({refusal}): "
                "use an https upstream"
            )
        register_secret(c.password)
    return creds
