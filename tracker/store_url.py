"""`StoreURL`: where a tracker keeps its state, parsed from the `store` setting.

Three forms, all Redis (or Valkey):

- `redis://HOST[:PORT][/DB]`: one server, plain TCP (port 6379, database 0 by default);
- `rediss://HOST[:PORT][/DB]`: the same over TLS (`store_ca_file` names the CA);
- `redis+sentinel://H1[:P1],H2[:P2],...[/SERVICE[/DB]]`: the primary that Sentinel
  names for SERVICE (default `p2preg`; sentinel port 26379), followed across failovers.

A user name may come before `@` (Redis 6 ACLs); a password never does: it comes
from `store_password_file` or `P2PREG_STORE_PASSWORD`, and a URL holding one is
refused without echoing it. This module is pure: it parses and formats, and must
not open connections (redis_store.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

from p2preg.core.config import ConfigError, HostPort

DEFAULT_SERVICE = "p2preg"
_DEFAULT_PORT = {"redis": 6379, "rediss": 6379, "redis+sentinel": 26379}


class StoreKind(StrEnum):
    REDIS = "redis"
    REDISS = "rediss"
    SENTINEL = "redis+sentinel"


@dataclass(frozen=True, slots=True)
class StoreURL:
    kind: StoreKind
    hosts: tuple[HostPort, ...]
    db: int = 0
    service: str | None = None  # Sentinel's name of the primary
    username: str | None = None

    @classmethod
    def from_config(cls, value: object) -> StoreURL:
        if not isinstance(value, str):
            raise ConfigError("store: expected a redis://, rediss:// or redis+sentinel:// URL")
        return parse_store_url(value)

    @property
    def tls(self) -> bool:
        return self.kind is StoreKind.REDISS

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        hosts = ",".join(str(h) for h in self.hosts)
        path = f"/{self.service}/{self.db}" if self.service is not None else f"/{self.db}"
        return f"{self.kind.value}://{user}{hosts}{path}"


def parse_store_url(text: str) -> StoreURL:
    """Errors never echo the URL's parts: a mistyped one may hold a secret."""
    if "?" in text or "#" in text:
        raise ConfigError(
            "store: the URL takes no query (options are tracker settings; a password goes "
            "in store_password_file or P2PREG_STORE_PASSWORD)"
        )
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in _DEFAULT_PORT:
        raise ConfigError("store: expected a redis://, rediss:// or redis+sentinel:// URL")
    kind = StoreKind(scheme)
    where, _, path = rest.partition("/")
    userinfo, at, hostlist = where.rpartition("@")
    username = None
    if at:
        if ":" in userinfo:
            # Never echo the URL: it holds the secret.
            raise ConfigError(
                "store: a password does not go in the URL; give store_password_file or "
                "P2PREG_STORE_PASSWORD"
            )
        username = unquote(userinfo) or None
    hosts = tuple(_host(h, _DEFAULT_PORT[scheme]) for h in hostlist.split(","))
    parts = [p for p in path.split("/") if p] if path else []
    service = None
    if kind is StoreKind.SENTINEL:
        service = parts.pop(0) if parts else DEFAULT_SERVICE
    elif len(hosts) != 1:
        raise ConfigError(f"store: {scheme}:// names one server; use redis+sentinel:// for more")
    if len(parts) > 1:
        raise ConfigError("store: the URL's path is /DB, or /SERVICE[/DB] for Sentinel")
    db = _db(parts[0]) if parts else 0
    return StoreURL(kind, hosts, db, service, username)


def _host(text: str, default_port: int) -> HostPort:
    if not text:
        raise ConfigError("store: a host is missing in the URL")
    bracketed = text.startswith("[")
    has_port = text.rfind(":") > text.rfind("]") if bracketed else text.count(":") == 1
    if not has_port:
        text = f"{text}:{default_port}"
    try:
        return HostPort.from_config(text)
    except ConfigError:
        raise ConfigError("store: a host in the URL is not HOST[:PORT]") from None


def _db(text: str) -> int:
    if not text.isdigit():
        raise ConfigError("store: the database in the URL is not a number")
    return int(text)
