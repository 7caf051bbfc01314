"""Typed, frozen configuration for every p2preg component.

One frozen dataclass per component; values come from CLI flags, then `P2PREG_*`
environment variables, then a TOML file, then the dataclass defaults, in that
order of precedence. Unknown keys are an error wherever they come from. This
module owns the loading rules and the node's config; it must not start anything.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

ENV_PREFIX = "P2PREG_"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


class FromConfig(Protocol):
    """A value type that parses itself from a CLI/env string or a TOML value."""

    @classmethod
    def from_config(cls, value: object) -> Self: ...


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def from_config(cls, value: object) -> HostPort:
        if not isinstance(value, str):
            raise ConfigError(f"expected HOST:PORT, got {value!r}")
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"expected HOST:PORT, got {value!r}")
        host = host.strip("[]") or "127.0.0.1"
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """A seed registry: `ns` is the name containerd sends as `?ns=`."""

    ns: str
    url: str

    @classmethod
    def from_config(cls, value: object) -> Upstream:
        if not isinstance(value, str):
            raise ConfigError(f"expected [NS=]URL, got {value!r}")
        ns, sep, url = value.partition("=")
        if not sep:
            ns, url = "", value
        url = url.rstrip("/")
        m = re.match(r"^(https?)://([^/?#@]+)$", url)
        if m is None:
            raise ConfigError(f"upstream URL must be http(s)://host[:port], got {url!r}")
        return cls(ns or m.group(2), url)


@dataclass(frozen=True, slots=True)
class Credential:
    """Basic credentials for one upstream registry (used to obtain bearer tokens)."""

    ns: str
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_config(cls, value: object) -> Credential:
        if isinstance(value, str):
            ns, sep, userpass = value.partition("=")
            user, sep2, password = userpass.partition(":")
            if sep and sep2 and ns and user:
                return cls(ns, user, password)
        raise ConfigError("credentials must be NS=USER:PASSWORD")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """`1048576`, `512MiB`, `2G` → bytes."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ConfigError(f"expected a size like 512MiB, got {text!r}")
    number, unit = int(m.group(1)), (m.group(2) or "").upper()
    if "I" in unit:
        return number << (10 * ("KMGT".index(unit[0]) + 1))
    return number * _SIZE_UNITS[unit[:1]]


def _coerce(name: str, tp: Any, value: object) -> object:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value in ("", None):
            return None
        return _coerce(name, args[0], value)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            items: list[object] = [v for v in value.split(",") if v]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(name, item, v) for v in items)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML `5` for a float setting
    if hasattr(tp, "from_config"):
        return tp.from_config(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int and name.endswith("_bytes"):
        return parse_size(value)
    if tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is Path:
        return Path(value)
    if tp is str:
        return value
    raise ConfigError(f"{name}: unsupported type {tp!r}")


C = TypeVar("C")


def load(
    cls: type[C],
    *,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
    env_keys: frozenset[str] = frozenset(),
) -> C:
    """Build `cls` from defaults < TOML `file` < `env` (P2PREG_*) < `cli`.

    `env_keys` names P2PREG_* variables that belong to other components and are
    ignored here rather than refused (one environment may configure both).
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw: dict[str, object] = {}
    if file is not None:
        try:
            with open(file, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file}: {e}") from None
        for key, value in data.items():
            attr = key.replace("-", "_")
            if attr not in known:
                raise ConfigError(f"config file {file}: unknown key {key!r}")
            raw[attr] = value
    for var, value in (env or {}).items():
        if not var.startswith(ENV_PREFIX):
            continue
        attr = var[len(ENV_PREFIX) :].lower()
        if attr in known:
            raw[attr] = value
        elif attr not in env_keys:
            raise ConfigError(f"unknown environment variable {var}")
    raw.update({k: v for k, v in (cli or {}).items() if v is not None})
    values = {k: _coerce(k, hints[k], v) for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True, slots=True)
class NodeConfig:
    listen: HostPort = HostPort("127.0.0.1", 5000)
    upstream: tuple[Upstream, ...] = ()
    data_dir: Path = Path("/var/lib/p2preg")
    tracker: str | None = None
    tracker_token: str | None = field(default=None, repr=False)
    # Peers of other machines must reach this; the facade stays on loopback.
    peer_host: str = "0.0.0.0"
    peer_port: int = 6881
    node_name: str | None = None
    # Below this a torrent costs more than it saves: straight from upstream.
    p2p_min_bytes: int = 1 * MiB
    # A swarm download with no new byte for this long falls back to upstream.
    swarm_stall_s: float = 30.0
    swarm_max_hash_failures: int = 16
    # Nobody waits forever for a lease holder: this long without progress from
    # the fetch waited for (or the tracker's queue), fetch from upstream.
    lease_wait_max_s: float = 600.0
    credentials: tuple[Credential, ...] = ()
    # Tags move; a short TTL keeps `latest` fresh without an upstream round trip per pull.
    tag_ttl_s: float = 30.0
    store_max_bytes: int = 50 * GiB
    # Each open blob stream holds at most one chunk in memory.
    stream_chunk_bytes: int = 1 * MiB
    max_blob_streams: int = 64
    upstream_timeout_s: float = 30.0
    upstream_retries: int = 4
    log_json: bool = False
    # /healthz and /metrics only, for Prometheus: the facade stays on loopback.
    metrics_listen: HostPort | None = None
    # On SIGTERM, responses in flight get this long to finish (keep it below
    # the orchestrator's kill timeout: Kubernetes' terminationGracePeriodSeconds).
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.upstream:
            raise ConfigError("at least one --upstream [NS=]URL is required")
        seen = [u.ns for u in self.upstream]
        if len(set(seen)) != len(seen):
            raise ConfigError("two upstreams share one registry name")
        if self.stream_chunk_bytes < 4096 or self.max_blob_streams < 1:
            raise ConfigError("stream_chunk_bytes must be ≥ 4096 and max_blob_streams ≥ 1")
        if self.tracker is not None and not re.match(r"^https?://[^/]+/?$", self.tracker):
            raise ConfigError(f"--tracker takes a base URL http://host:port, got {self.tracker!r}")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s must be ≥ 0")

    def upstream_for(self, ns: str | None) -> Upstream | None:
        if not ns:
            return self.upstream[0]
        return next((u for u in self.upstream if u.ns == ns), None)

    def credential_for(self, ns: str) -> Credential | None:
        return next((c for c in self.credentials if c.ns == ns), None)
