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
from dataclasses import dataclass
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

# Two keys that spell one setting (a single value, or a list): a source of
# higher precedence that gives either replaces what a lower one gave for both,
# and one source giving both is an error.
SAME_SETTING: dict[str, str] = {"tracker": "trackers", "trackers": "tracker"}


def _put(raw: dict[str, object], given: Mapping[str, object], where: str) -> None:
    """Add one source's values over the lower sources' ones (`SAME_SETTING` pairs as one)."""
    for key in given:
        other = SAME_SETTING.get(key)
        if other is None:
            continue
        if other in given:
            raise ConfigError(f"{where}: give {key} or {other}, not both")
        raw.pop(other, None)
    raw.update(given)

# Every component's setting names. One environment may configure a node and a
# tracker, so a P2PREG_* variable that names another component's setting is not
# a typo; any other unknown one is. tests/test_config.py holds this table
# against the components' dataclasses, so it cannot drift from them.
COMPONENT_KEYS: dict[str, frozenset[str]] = {
    "node": frozenset(
        {
            "admin_token_file",
            "cluster_fallback",
            "containerd_config",
            "containerd_hosts_dir",
            "containerd_version",
            "credentials",
            "credentials_file",
            "data_dir",
            "insecure",
            "lease_wait_max_s",
            "listen",
            "log_json",
            "max_blob_streams",
            "metrics_listen",
            "node_name",
            "p2p_min_bytes",
            "chunking",
            "chunk_bytes",
            "chunk_min_count",
            "peer_host",
            "peer_download_limit_bytes_s",
            "peer_port",
            "peer_ssl_port",
            "pinned_images",
            "serve_stale_s",
            "peer_upload_limit_bytes_s",
            "shutdown_grace_s",
            "store_max_bytes",
            "stream_chunk_bytes",
            "peer_stall_report_s",
            "relay_refresh_s",
            "swarm_max_hash_failures",
            "swarm_stall_s",
            "tag_ttl_s",
            "tls_dir",
            "tracker",
            "tracker_token",
            "tracker_token_file",
            "trackers",
            "trusted_realms",
            "upstream",
            "upstream_download_limit_bytes_s",
            "upstream_retries",
            "upstream_timeout_s",
        }
    ),
    "tracker": frozenset(
        {
            "admin_listen",
            "announce_interval_s",
            "data_dir",
            "default_numwant",
            "dispute_quarantine_s",
            "insecure",
            "lease_grant_ack_s",
            "lease_min_rate_bytes_s",
            "lease_rate_window_s",
            "lease_silence_s",
            "lease_ttl_s",
            "lease_wait_max_s",
            "listen",
            "log_json",
            "max_leases_per_node",
            "max_long_polls",
            "max_long_polls_per_identity",
            "max_metainfo",
            "max_metainfo_bytes",
            "max_manifests",
            "max_manifest_store_bytes",
            "max_numwant",
            "max_peers",
            "max_peers_per_swarm",
            "max_preauth_connections",
            "max_preauth_connections_per_ip",
            "max_scrape_hashes",
            "max_tag_answers",
            "metainfo_idle_expiry_s",
            "metrics_listen",
            "min_announce_interval_s",
            "peer_ttl_s",
            "pinned_digests",
            "quota_lease_burst",
            "quota_lease_per_s",
            "quota_publish_burst",
            "quota_publish_per_s",
            "quota_report_burst",
            "quota_report_per_s",
            "replica_advertise",
            "replica_term_s",
            "seeder_announce_interval_s",
            "stall_cooloff_s",
            "stall_reporters",
            "stall_window_s",
            "store",
            "store_ca_file",
            "store_password",
            "store_password_file",
            "tls_dir",
            "token",
            "token_file",
            "trusted_ip_sources",
            "udp",
            "upstream_fetches_per_image",
            "upstream_handoff_s",
        }
    ),
}
ANY_COMPONENT_KEY = frozenset().union(*COMPONENT_KEYS.values())

# Settings that hold a secret or name the file of one. Elsewhere an empty
# value means "unset"; here it is an error: `P2PREG_TOKEN=` from a template
# whose secret did not render must not turn authentication off.
SECRET_KEYS = frozenset(
    {"token", "token_file", "tracker_token", "tracker_token_file", "admin_token_file",
     "credentials_file", "store_password", "store_password_file"}
)


def load(
    cls: type[C],
    *,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> C:
    """Build `cls` from defaults < TOML `file` < `env` (P2PREG_*) < `cli`.

    P2PREG_* variables that name another component's setting (`COMPONENT_KEYS`)
    are ignored here rather than refused.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw: dict[str, object] = {}
    from_file: dict[str, object] = {}
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
            from_file[attr] = value
    _put(raw, from_file, f"config file {file}")
    from_env: dict[str, object] = {}
    for var, value in (env or {}).items():
        if not var.startswith(ENV_PREFIX):
            continue
        attr = var[len(ENV_PREFIX) :].lower()
        if attr in known:
            from_env[attr] = value
        elif attr not in ANY_COMPONENT_KEY:
            raise ConfigError(f"unknown environment variable {var}")
    _put(raw, from_env, "environment")
    _put(raw, {k: v for k, v in (cli or {}).items() if v is not None}, "command line")
    for key in SECRET_KEYS & raw.keys():
        value = raw[key]
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{key} is empty: give the secret, or leave the setting out")
    values = {k: _coerce(k, hints[k], v) for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


KiB = 1024
MiB = 1024**2
GiB = 1024**3
