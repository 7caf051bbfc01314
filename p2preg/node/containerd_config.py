"""`p2preg containerd-config`: send containerd's pulls to the node, upstream as fallback.

Owns writing `<hosts-dir>/<registry>/hosts.toml` for each registry the node
mirrors (and `_default/hosts.toml` on request): the node is the first host,
the registry itself stays the `server`, so a node that is down or refuses a
request costs containerd one refused connection, not a failed pull. It also
reads the daemon's version and its `config.toml` (p2preg/node/containerd_check.py),
because containerd's CRI plugin (what kubelet pulls through) ignores hosts.toml
until its registry `config_path` names the directory (and, from 2.1, until
`use_local_image_pull` is set), and containerd reads that only when it starts.
Files the daemon would ignore look like a working setup, so it refuses to
write them (exit 2, naming the TOML keys to add) unless told they are for ctr
alone. It never edits config.toml and never restarts containerd (that is a
decision for whoever runs the machine, as with Spegel and Dragonfly).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2preg.core.config import ConfigError, HostPort, load
from p2preg.node.config import NodeConfig, Upstream
from p2preg.node.containerd_check import ConfigCheck, check_config, detect_version, parse_version

MARKER = "# Written by `p2preg containerd-config`"
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_NAMESPACE = "_default"
# containerd's own name for Docker Hub's API host.
DOCKER_HUB = ("docker.io", "https://registry-1.docker.io")
# A config written just before containerd started is not "changed since": the
# start time has a granularity of one clock tick and the writer may be a script.
STALE_MARGIN_S = 1.0
EXIT_FOREIGN_FILE = 1


@dataclass(frozen=True, slots=True)
class Registry:
    """A registry name as containerd sees it (`docker.io`), and its real API URL."""

    name: str
    server: str | None  # None: containerd's own default (only for `_default`)


def parse_registry(text: str) -> Registry:
    """`NAME=URL`, or a bare `NAME` (https://NAME; Docker Hub's API host for docker.io)."""
    if "=" in text:
        up = Upstream.from_config(text)
        return Registry(up.ns, up.url)
    if not text or "/" in text:
        raise ConfigError(f"--registry takes NAME[=URL], got {text!r}")
    return Registry(text, DOCKER_HUB[1] if text == DOCKER_HUB[0] else f"https://{text}")


def node_url(listen: HostPort) -> str:
    """The URL containerd on this machine uses to reach a node listening on `listen`."""
    host = listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard listener answers on loopback too
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def render_hosts_toml(registry: Registry, node: str) -> str:
    """hosts.toml for one registry: the node first, the registry itself as fallback."""
    what = (
        "every registry without a directory of its own"
        if registry.name == DEFAULT_NAMESPACE
        else registry.name
    )
    lines = [
        f"{MARKER}: pulls of {what} go to the p2preg node",
        "# first; when it does not answer (or refuses), containerd falls back to the registry.",
    ]
    if registry.server is not None:
        lines.append(f"server = {_toml_str(registry.server)}")
    lines += [
        "",
        f"[host.{_toml_str(node)}]",
        '  capabilities = ["pull", "resolve"]',
        "",
    ]
    return "\n".join(lines)


def _toml_str(s: str) -> str:
    # A basic TOML string; the URLs and names here need no escapes but quotes.
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- containerd's config.toml ------------------------------------------------------


def read_containerd_config(root: Path, config_file: Path) -> str | None:
    """The host's containerd config text, None when it has none."""
    try:
        return on_host(root, config_file).read_text()
    except FileNotFoundError:
        return None


def check_host(
    root: Path, config_file: Path, hosts_dir: Path, version: str | None
) -> ConfigCheck:
    """The finding for this host's containerd: `version` as given, else `containerd --version`."""
    daemon = parse_version(version) if version else detect_version()
    if version and daemon is None:
        raise ConfigError(f"--containerd-version takes a version such as 2.1.3, got {version!r}")
    return check_config(read_containerd_config(root, config_file), hosts_dir, config_file, daemon)


def _containerd_config_of(cmdline: list[str]) -> Path:
    for i, arg in enumerate(cmdline):
        if arg in ("--config", "-c") and i + 1 < len(cmdline):
            return Path(cmdline[i + 1])
        if arg.startswith("--config="):
            return Path(arg.partition("=")[2])
    return DEFAULT_CONTAINERD_CONFIG


def stale_containerd(config_file: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of running containerds of `config_file` started before it last changed.

    Only processes visible here count (a pod without hostPID sees none).
    """
    try:
        mtime = config_file.stat().st_mtime
        btime = next(
            int(line.split()[1])
            for line in (proc / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    stale = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "containerd":
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            # The start time is field 22; the command name before it may hold spaces.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            started = btime + int(fields[19]) / ticks
        except (OSError, IndexError, ValueError):
            continue
        mine = _containerd_config_of(cmdline)
        try:
            same = mine.resolve() == config_file.resolve()
        except OSError:
            same = False
        if same and started + STALE_MARGIN_S < mtime:
            stale.append(int(entry.name))
    return sorted(stale)


# -- writing ------------------------------------------------------------------------


def write_file(path: Path, text: str, *, force: bool, marker: str = MARKER) -> str:
    """Write `text` atomically; returns "wrote", "unchanged" or "kept" (a file not
    starting with `marker`: someone else's)."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = None
    if old == text:
        return "unchanged"
    if old is not None and not old.startswith(marker) and not force:
        return "kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return "wrote"


# -- CLI ------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="NODE_TOML",
        help="the node's TOML config: its upstreams are the registries, its listen the node",
    )
    p.add_argument(
        "--registry",
        action="append",
        metavar="NAME[=URL]",
        help="a registry to send to the node (repeatable; default: the node config's upstreams)",
    )
    p.add_argument("--node", metavar="URL", help="the node's URL (default: from its listen)")
    p.add_argument(
        "--default",
        action="store_true",
        help="also write _default/hosts.toml: every other registry tries the node first",
    )
    p.add_argument(
        "--hosts-dir",
        type=Path,
        metavar="DIR",
        help=f"the host's hosts.toml directory, as its containerd names it ({DEFAULT_HOSTS_DIR})",
    )
    p.add_argument(
        "--containerd-config",
        type=Path,
        metavar="PATH",
        help=f"containerd's config to check for config_path ({DEFAULT_CONTAINERD_CONFIG})",
    )
    p.add_argument(
        "--containerd-version",
        metavar="VERSION",
        help="the daemon's version (1.6, 2.1.3, ...) where `containerd --version` cannot run",
    )
    p.add_argument(
        "--ctr-only",
        action="store_true",
        help="write the files even when kubelet pulls would ignore them (for ctr/nerdctl "
        "--hosts-dir); otherwise such a host is refused with exit 2",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite hosts.toml files not written by p2preg"
    )
    p.add_argument(
        "--host-root",
        type=Path,
        metavar="DIR",
        help="where the host's / is mounted (in a pod: /host); paths above are the host's",
    )
    p.add_argument("--dry-run", action="store_true", help="print the files, write nothing")


def _node_config(args: argparse.Namespace) -> NodeConfig | None:
    file = getattr(args, "config", None)
    if file is None and "P2PREG_UPSTREAM" not in os.environ:
        return None
    return load(NodeConfig, env=os.environ, file=file)


def _default_listen() -> HostPort:
    field = next(f for f in dataclasses.fields(NodeConfig) if f.name == "listen")
    assert isinstance(field.default, HostPort)
    return field.default


def default_node_url() -> str:
    """The URL of a node with the default `listen`, from this machine."""
    return node_url(_default_listen())


def on_host(root: Path, path: Path) -> Path:
    """Where the host's `path` is seen from here, the host's / being mounted at `root`."""
    return root / path.relative_to(path.anchor) if path.is_absolute() else root / path


def _loud(lines: Sequence[str]) -> str:
    bar = "*" * 78
    return "\n".join([bar, *lines, bar])


def run(args: argparse.Namespace) -> int:
    node_config = _node_config(args)
    given = getattr(args, "registry", None)
    if given:
        registries = [parse_registry(r) for r in given]
    elif node_config is not None:
        registries = [Registry(u.ns, u.url) for u in node_config.upstream]
    else:
        raise ConfigError("name the registries (--registry NAME[=URL]) or the node's --config")
    if getattr(args, "default", False):
        registries.append(Registry(DEFAULT_NAMESPACE, None))
    node = getattr(args, "node", None) or node_url(
        node_config.listen if node_config is not None else _default_listen()
    )
    hosts_dir: Path = getattr(args, "hosts_dir", DEFAULT_HOSTS_DIR)
    root: Path = getattr(args, "host_root", Path("/"))
    if getattr(args, "dry_run", False):
        for registry in registries:
            path = on_host(root, hosts_dir / registry.name / "hosts.toml")
            print(f"# {path}\n{render_hosts_toml(registry, node)}")
        return 0
    config_file: Path = getattr(args, "containerd_config", DEFAULT_CONTAINERD_CONFIG)
    check = check_host(root, config_file, hosts_dir, getattr(args, "containerd_version", None))
    if not check.ok and not getattr(args, "ctr_only", False):
        # Files the daemon would ignore look like a working setup: write none.
        raise ConfigError(
            f"refusing to write hosts.toml that kubelet pulls would ignore (containerd "
            f"{check.version}): {check.message} (--ctr-only writes them for ctr alone)"
        )
    kept = _write_all(registries, node, root, hosts_dir, force=getattr(args, "force", False))
    _report_containerd(root, config_file, check)
    return EXIT_FOREIGN_FILE if kept else 0


def _write_all(
    registries: Sequence[Registry], node: str, root: Path, hosts_dir: Path, *, force: bool
) -> list[Path]:
    """Write every registry's hosts.toml; returns the foreign files left alone."""
    kept = []
    for registry in registries:
        path = on_host(root, hosts_dir / registry.name / "hosts.toml")
        outcome = write_file(path, render_hosts_toml(registry, node), force=force)
        fallback = registry.server or "containerd's default"
        print(f"{outcome:9} {path}  ({registry.name} → {node}, fallback {fallback})")
        if outcome == "kept":
            kept.append(path)
    if kept:
        print(
            "containerd-config: left alone files that p2preg did not write (use --force): "
            + ", ".join(map(str, kept)),
            file=sys.stderr,
        )
    return kept


def _report_containerd(root: Path, config_file: Path, check: ConfigCheck) -> None:
    """Say whether kubelet pulls read the files, loudly when they do not (--ctr-only)."""
    if check.ok:
        print(f"containerd {check.version}: {check.message}")
    else:
        lines = ["WARNING: kubelet pulls will NOT go through p2preg on this machine."]
        lines.append(check.message)
        if check.fix:
            lines += [
                f"One-time change on this machine: add to {config_file}",
                "",
                *("    " + line for line in check.fix.splitlines()),
                "",
                "then restart containerd (running containers keep running):",
                "    systemctl restart containerd",
            ]
        lines.append("ctr and nerdctl with --hosts-dir use the files above without it.")
        print(_loud(lines), file=sys.stderr)
    stale = stale_containerd(on_host(root, config_file))
    if stale:
        pids = ", ".join(map(str, stale))
        print(
            _loud(
                [
                    f"WARNING: containerd (pid {pids}) started before {config_file} last changed.",
                    "containerd reads its config only when it starts: restart it to apply "
                    "the change (systemctl restart containerd).",
                ]
            ),
            file=sys.stderr,
        )
