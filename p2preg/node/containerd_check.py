"""Whether a containerd daemon's CRI plugin (what kubelet pulls through) reads our hosts.toml.

Owns reading `containerd --version` output and containerd's `config.toml`
(config version 1, 2 or 3) and deciding, for that daemon version, whether CRI
pulls consult a given hosts directory, and which exact TOML keys to add when
they do not. Sans-IO apart from `detect_version` (one bounded subprocess) and
`watch_host` (reads the file): it must not write containerd's config or
restart anything.

What differs between versions:
- 1.6/1.7 read `plugins."io.containerd.grpc.v1.cri".registry.config_path`
  (version 2; `plugins.cri` in version 1), empty by default, and split it on `:`.
- 2.x reads `plugins.'io.containerd.cri.v1.images'.registry.config_path`
  (version 3; a version 2 file is migrated when loaded), whose default is the
  list `/etc/containerd/certs.d:/etc/docker/certs.d`. From 2.1 CRI pulls go
  through the transfer service, which takes config_path as ONE directory (a
  list names no directory at all, and the mirror is skipped without a word),
  unless `use_local_image_pull = true` sends them down the local pull path.
  We ask every 2.x for a single directory, so an upgrade or a change of pull
  path cannot quietly bypass the node, and 2.1+ for `use_local_image_pull`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

CRI_V1 = "cri"  # config version 1's short plugin name
CRI_V2 = "io.containerd.grpc.v1.cri"  # containerd 1.x, config version 2
CRI_V3_IMAGES = "io.containerd.cri.v1.images"  # containerd 2.x, config version 3
V3_DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
VERSION_TIMEOUT_S = 10.0
BYPASS = "kubelet pulls bypass the node"
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> Version | None:
    """The daemon version in `containerd --version` output, or a bare `2.1`/`v2.1.3`.

    Debian prints `containerd github.com/containerd/containerd 1.6.20~ds1 …`,
    upstream 2.x `containerd github.com/containerd/containerd/v2 v2.1.1 <commit>`.
    """
    for word in text.split():
        m = _VERSION.match(word)
        if m:
            return Version(int(m[1]), int(m[2]), int(m[3] or 0))
    return None


def detect_version(binary: str = "containerd") -> Version | None:
    """Run `containerd --version`; None when there is no such binary here (a pod)."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(out)


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """What the daemon's config means for CRI pulls through `hosts_dir`.

    `keys` are the exact TOML keys (dotted, with their values) to add when not
    `ok`; `fix` is the same as tables to paste into config.toml.
    """

    ok: bool
    message: str
    fix: str = ""
    keys: tuple[str, ...] = ()
    version: str = "unknown"

    def as_json(self) -> dict[str, object]:
        # With keys to add, containerd runs but its CRI plugin ignores hosts_dir:
        # kubelet still pulls, from the registries themselves, and the node looks idle.
        reason = f"{BYPASS}: {self.message}" if self.keys and not self.ok else self.message
        return {"ok": self.ok, "reason": reason, "version": self.version, "add": list(self.keys)}


def _table(doc: Mapping[str, object], *keys: str) -> Mapping[str, object]:
    node: object = doc
    for key in keys:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _plugin(config_version: int) -> str:
    if config_version >= 3:
        return f"plugins.'{CRI_V3_IMAGES}'"
    return f'plugins."{CRI_V2}"' if config_version == 2 else f"plugins.{CRI_V1}"


def _fix(config_version: int, hosts_dir: Path, *, local_pull: bool) -> tuple[tuple[str, ...], str]:
    plugin = _plugin(config_version)
    keys = [f"{plugin}.registry.config_path = {_q(str(hosts_dir))}"]
    tables = [f"[{plugin}.registry]\n  config_path = {_q(str(hosts_dir))}"]
    if local_pull:
        keys.insert(0, f"{plugin}.use_local_image_pull = true")
        tables.insert(0, f"[{plugin}]\n  use_local_image_pull = true")
    return tuple(keys), "\n\n".join(tables)


def check_config(
    text: str | None, hosts_dir: Path, path: Path, daemon: Version | None
) -> ConfigCheck:
    """Whether CRI pulls of a containerd `daemon` with this config read `hosts_dir`.

    `text` None: the file does not exist (containerd runs on its defaults).
    An unknown daemon version is taken from the config's own version: 3 means
    2.x, and then 2.1+ (the stricter reading), else 1.x.
    """
    if text is None:
        doc: dict[str, object] = {"version": 3 if daemon and daemon.major >= 2 else 2}
        where = f"{path} does not exist (containerd runs on its defaults)"
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            return ConfigCheck(False, f"{path} is not valid TOML ({e}); containerd will not start.")
        where = str(path)
    raw = doc.get("version", 1)
    config_version = raw if isinstance(raw, int) else 1
    if daemon is None:
        assumed = Version(2, 1) if config_version >= 3 else Version(1, 7)
        shown = f"unknown (taken as {assumed.major}.x from config version {config_version})"
    else:
        assumed, shown = daemon, str(daemon)
    result = _judge(doc, config_version, assumed, hosts_dir, where)
    return ConfigCheck(result.ok, result.message, result.fix, result.keys, shown)


def _judge(
    doc: Mapping[str, object], config_version: int, daemon: Version, hosts_dir: Path, where: str
) -> ConfigCheck:
    v2x = daemon.major >= 2
    needs_local = daemon >= Version(2, 1)
    if not v2x and config_version >= 3:
        return ConfigCheck(
            False, f"{where}: containerd {daemon.major}.{daemon.minor} reads config version 1 "
            f"or 2 only, not {config_version}; it will not start with this file."
        )
    disabled = doc.get("disabled_plugins", [])
    if isinstance(disabled, list) and {CRI_V2, CRI_V1, CRI_V3_IMAGES} & set(map(str, disabled)):
        return ConfigCheck(True, f"{where} disables containerd's CRI plugin: no kubelet pulls "
                           "here; ctr and nerdctl read hosts.toml with --hosts-dir.")
    if needs_local and config_version < 3:
        keys, fix = _fix(3, hosts_dir, local_pull=True)
        return ConfigCheck(
            False, f"{where} is config version {config_version}: containerd 2.1+ pulls for "
            "kubelet through its transfer service, and use_local_image_pull, which makes it "
            "read hosts.toml as p2preg writes them, exists in version 3 only. Migrate "
            "(containerd config migrate > new.toml) and add " + " and ".join(keys) + ".",
            f"version = 3\n\n{fix}", keys,
        )
    plugin = CRI_V3_IMAGES if config_version >= 3 else CRI_V2 if config_version == 2 else CRI_V1
    images = _table(doc, "plugins", plugin)
    registry = _table(images, "registry")
    keys, fix = _fix(config_version, hosts_dir, local_pull=needs_local)
    if registry.get("mirrors"):
        return ConfigCheck(
            False, f"{where} sets the deprecated registry.mirrors: containerd refuses it "
            "together with config_path. Move those mirrors into hosts.toml files, remove them, "
            "and add " + " and ".join(keys) + ".", fix, keys,
        )
    raw = registry.get("config_path", V3_DEFAULT_CONFIG_PATH if v2x else "")
    config_path = raw if isinstance(raw, str) else ""
    if not config_path:
        return ConfigCheck(
            False, f"{where} sets no {_plugin(config_version)}.registry.config_path: the CRI "
            f"plugin, and so kubelet, ignores {hosts_dir}. Add " + " and ".join(keys) + ".",
            fix, keys,
        )
    # 1.x (and 2.x's local pull) split on ":"; 2.1's transfer service does not.
    dirs = [Path(config_path)] if v2x else [Path(d) for d in config_path.split(":") if d]
    if hosts_dir not in dirs:
        how = "one directory" if v2x else "a `:`-separated list"
        return ConfigCheck(
            False, f"{where}: config_path = {config_path!r}, read by containerd "
            f"{daemon.major}.x as {how}, is not {hosts_dir}. Set " + " and ".join(keys) + ".",
            fix, keys,
        )
    if needs_local and images.get("use_local_image_pull") is not True:
        keys, fix = keys[:1], fix.split("\n\n")[0]
        return ConfigCheck(
            False, f"{where}: containerd 2.1+ pulls for kubelet through its transfer service "
            f"unless use_local_image_pull is true, and then skips {hosts_dir}. Add {keys[0]}.",
            fix, keys,
        )
    return ConfigCheck(True, f"{where}: the CRI plugin reads hosts.toml from {hosts_dir}.")


def watch_host(
    path: Path, hosts_dir: Path, version: str | None
) -> Callable[[], dict[str, object]]:
    """A node's view of its host: the finding as JSON, the file re-read at every call.

    containerd reads its config only when it starts, but an operator fixing it
    edits the file first; the version (`version`, else `containerd --version`)
    is read once.
    """
    daemon = parse_version(version) if version else detect_version()

    def check() -> dict[str, object]:
        try:
            text: str | None = path.read_text()
        except FileNotFoundError:
            text = None
        except OSError as e:
            reason = f"{path}: cannot read it ({e.strerror})"
            return ConfigCheck(False, reason, version=str(daemon or "unknown")).as_json()
        return check_config(text, hosts_dir, path, daemon).as_json()

    return check
