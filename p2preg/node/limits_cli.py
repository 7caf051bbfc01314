"""`p2preg limits`: show or change a running node's bandwidth caps.

Owns the command line of `p2preg limits show` and `p2preg limits set
--peer-upload RATE --peer-download RATE --upstream RATE` (any of the three;
`0` lifts a cap), which read and change `/_p2preg/limits` (limits.py) on the
node's loopback facade with its admin token, as `p2preg status` reads the
node. A bad rate is refused here, in one line, before anything is sent. It
must not change anything but the caps.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from p2preg.core.config import ConfigError
from p2preg.node.adminauth import ADMIN_TOKEN_ENV, admin_headers, read_admin_token
from p2preg.node.limits import LIMITS_PATH
from p2preg.node.rates import RATE_HELP, format_rate, parse_rate

# flag → the direction the node calls it
FLAGS = {
    "peer_upload": "peer_upload",
    "peer_download": "peer_download",
    "upstream": "upstream_download",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from p2preg.node.containerd_config import default_node_url

    p.add_argument("action", choices=("show", "set"), help="show the caps, or set some")
    p.add_argument("--peer-upload", metavar="RATE", help="cap on what peers get from the node")
    p.add_argument("--peer-download", metavar="RATE", help="cap on what the node takes from peers")
    p.add_argument("--upstream", metavar="RATE",
                   help="cap on what the node takes from its seed registries")
    p.add_argument(
        "--node", metavar="URL", help=f"the node's facade (default {default_node_url()})"
    )
    p.add_argument(
        "--admin-token-file", metavar="FILE",
        help=f"the node's admin token (default ${ADMIN_TOKEN_ENV}, "
        "else /var/lib/p2preg/admin.token)",
    )
    p.add_argument("--json", action="store_true", help="print the node's answer as JSON")
    p.epilog = f"RATE: {RATE_HELP}."


def requested(args: argparse.Namespace) -> dict[str, int]:
    """The caps `set` asks for, by the node's direction names; ConfigError names a bad one."""
    caps = {}
    for flag, direction in FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        try:
            caps[direction] = parse_rate(value)
        except ConfigError as e:
            raise ConfigError(f"--{flag.replace('_', '-')}: {e}") from None
    return caps


def limits_table(doc: dict[str, Any], url: str) -> Table:
    table = Table(title=f"bandwidth caps of {url}", title_justify="left")
    for name, justify in (("direction", "left"), ("cap", "right"), ("rate now", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for direction, cap in doc["caps"].items():
        note = "" if doc["swarm"] or direction.startswith("upstream") else " (no swarm)"
        table.add_row(direction.replace("_", " "), format_rate(cap) + note,
                      format_rate(doc["rates"][direction]) if doc["rates"][direction] else "0")
    return table


def run(args: argparse.Namespace) -> int:
    from p2preg.node.containerd_config import default_node_url

    caps = requested(args)
    if args.action == "set" and not caps:
        raise ConfigError("limits set: give --peer-upload, --peer-download or --upstream")
    if args.action == "show" and caps:
        raise ConfigError("limits show takes no rate: `p2preg limits set …` changes them")
    node = (getattr(args, "node", None) or default_node_url()).rstrip("/")
    headers = admin_headers(read_admin_token(getattr(args, "admin_token_file", None)))
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as http:
            if args.action == "set":
                r = http.put(node + LIMITS_PATH, params=caps, headers=headers)
            else:
                r = http.get(node + LIMITS_PATH, headers=headers)
    except httpx.HTTPError as e:
        print(f"p2preg limits: {node}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        try:
            said = r.json()["errors"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            said = r.text[:200]
        print(f"p2preg limits: the node answered {r.status_code}: {said}", file=sys.stderr)
        return 1
    doc = r.json()
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
    else:
        Console().print(limits_table(doc, node))
    return 0
