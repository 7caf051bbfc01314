"""`p2preg registries-conf`: mirror entries for podman/CRI-O and for k3s/RKE2.

Owns rendering, from the node's config, the `registries.conf` drop-in that
podman and CRI-O read (containers-registries.conf(5)) and the `registries.yaml`
that k3s and RKE2 turn into containerd's configuration. containers/image sends
no `?ns=`, so each upstream gets a mirror `location` of `node/<ns>`: the node
reads the first path segment as the upstream (routes.py). containerd (under
k3s) sends `?ns=` itself, so its endpoint is the node's bare URL. The registry
itself stays the fallback. It writes one file (or prints it) and never edits or
restarts anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from p2preg.core.config import ConfigError, load
from p2preg.core.reference import InvalidName, parse_name
from p2preg.node.config import NodeConfig, Upstream
from p2preg.node.containerd_config import DOCKER_HUB, node_url, write_file

MARKER = "# Written by `p2preg registries-conf`"
FORMATS = ("podman", "k3s")
EXIT_FOREIGN_FILE = 1


def _toml_str(s: str) -> str:
    # JSON's string escapes are TOML's basic-string escapes for these names.
    return json.dumps(s)


def node_address(node: str) -> str:
    """`host:port` of the node, from its URL (`http://127.0.0.1:5000`) or as given."""
    parts = urlsplit(node if "://" in node else f"http://{node}")
    if parts.scheme != "http" or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"--node takes the node's http://HOST:PORT, got {node!r}")
    return parts.netloc


def path_prefix(upstream: Upstream, first: bool) -> str:
    """The path segment naming `upstream` in a mirror location ("" for the default one).

    A name that is no repository path component (`localhost:5000`) cannot be a
    prefix; only the first upstream, which serves requests naming none, may go
    without one.
    """
    try:
        parse_name(upstream.ns)
        if "/" not in upstream.ns:
            return upstream.ns
    except InvalidName:
        pass
    if first:
        return ""
    raise ConfigError(
        f"upstream {upstream.ns!r} cannot name itself in a mirror path (lower-case letters, "
        "digits and . _ - only): give it such a name in the node config (NAME=URL), or list "
        "it first"
    )


def _registry_location(upstream: Upstream) -> tuple[str, bool]:
    """Where podman goes when the node does not answer, and whether that is plain HTTP."""
    parts = urlsplit(upstream.url)
    if upstream.ns == DOCKER_HUB[0] and upstream.url == DOCKER_HUB[1]:
        return DOCKER_HUB[0], False  # containers/image's own name for Docker Hub
    return parts.netloc, parts.scheme == "http"


def render_podman(upstreams: Sequence[Upstream], node: str) -> str:
    """A registries.conf drop-in: for each upstream, the node first, the registry after."""
    address = node_address(node)
    lines = [
        f"{MARKER}: pulls of each registry below try the p2preg node",
        "# first (plain HTTP on this machine); when it does not answer, the registry itself.",
    ]
    for i, upstream in enumerate(upstreams):
        prefix = path_prefix(upstream, first=i == 0)
        location, plain = _registry_location(upstream)
        lines += ["", "[[registry]]", f"prefix = {_toml_str(upstream.ns)}"]
        lines.append(f"location = {_toml_str(location)}")
        if plain:
            lines.append("insecure = true")
        mirror = f"{address}/{prefix}" if prefix else address
        lines += ["", "[[registry.mirror]]", f"location = {_toml_str(mirror)}", "insecure = true"]
    return "\n".join(lines) + "\n"


def render_k3s(upstreams: Sequence[Upstream], node: str) -> str:
    """registries.yaml: the node first, then the upstream's own URL when containerd's
    default endpoint for the name is not it (k3s always tries that default last)."""
    url = f"http://{node_address(node)}"
    lines = [
        f"{MARKER} --format k3s: containerd tries the p2preg node",
        "# first (it sends ?ns=, so no rewrite is needed), then the registry itself.",
        "mirrors:",
    ]
    for upstream in upstreams:
        endpoints = [url]
        default = DOCKER_HUB[1] if upstream.ns == DOCKER_HUB[0] else f"https://{upstream.ns}"
        if upstream.url not in (default, "https://index.docker.io"):
            endpoints.append(upstream.url)
        lines += [f"  {json.dumps(upstream.ns)}:", "    endpoint:"]
        lines += [f"      - {json.dumps(e)}" for e in endpoints]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="NODE_TOML",
        help="the node's TOML config: its upstreams are the registries, its listen the node",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="podman: registries.conf (podman, CRI-O, buildah, skopeo); "
        "k3s: registries.yaml (k3s, RKE2). Default: podman",
    )
    p.add_argument("--node", metavar="HOST:PORT", help="the node's address (default: its listen)")
    p.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write here (atomically) instead of printing, e.g. "
        "/etc/containers/registries.conf.d/50-p2preg.conf or /etc/rancher/k3s/registries.yaml",
    )
    p.add_argument("--force", action="store_true", help="overwrite a file p2preg did not write")


def run(args: argparse.Namespace) -> int:
    file = getattr(args, "config", None)
    if file is None and "P2PREG_UPSTREAM" not in os.environ:
        raise ConfigError("give the node's --config (its upstreams are the registries)")
    config = load(NodeConfig, env=os.environ, file=file)
    node = getattr(args, "node", None) or node_url(config.listen)
    fmt = getattr(args, "format", "podman")
    render = render_k3s if fmt == "k3s" else render_podman
    text = render(config.upstream, node)
    output: Path | None = getattr(args, "output", None)
    if output is None:
        sys.stdout.write(text)
        return 0
    outcome = write_file(output, text, force=getattr(args, "force", False), marker=MARKER)
    print(f"{outcome:9} {output}  ({len(config.upstream)} registries → {node_address(node)})")
    if outcome == "kept":
        print(
            f"registries-conf: left {output} alone: p2preg did not write it (use --force)",
            file=sys.stderr,
        )
        return EXIT_FOREIGN_FILE
    return 0
