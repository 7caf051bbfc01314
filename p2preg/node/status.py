"""`p2preg status`: a node's or the tracker's state, as readable tables.

Owns reading a node's `GET /_p2preg/status` (p2preg/node/admin.py) and the
tracker's `GET /v1/status` (tracker/server.py) and laying them out with rich;
`--json` prints what was read, unchanged, for scripts. For a node on this
machine it also reads this machine's containerd (version and config.toml,
p2preg/node/containerd_check.py) and reports, as the `containerd` field,
whether kubelet pulls go through the node at all; a node that watches the
host's config itself (`containerd_config`) is taken at its word unless a
containerd flag is given. It only reads: it must not change anything on
either side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from rich.console import Console
from rich.table import Table

from p2preg.core import errors as tracker_errors
from p2preg.core.tls import ReloadingTLS
from p2preg.node.admin import STATUS_PATH
from p2preg.node.adminauth import ADMIN_TOKEN_ENV, admin_headers, read_admin_token
from p2preg.node.operator_tls import add_tls_argument, read_tls, tracker_urls
from p2preg.node.preheat import TOKEN_ENV, human_size, read_token
from tracker.client import TrackerClient, open_tracker_client


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "—"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s"


def node_tables(doc: dict[str, Any], url: str, recent: int) -> list[Table]:
    """The node's state and its recent fetches."""
    store, swarm, moved, fetches = doc["store"], doc["swarm"], doc["bytes"], doc["fetches"]
    grid = Table(title=f"node {doc['node']}  ({url})", title_justify="left", show_header=False)
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("version", f"{doc['version']}, up {_duration(doc['uptime_s'])}")
    if "upstreams" in doc:
        grid.add_row("upstreams", ", ".join(f"{u['ns']} = {u['url']}" for u in doc["upstreams"]))
    grid.add_row(
        "store",
        f"{human_size(store['bytes'])} of {human_size(store['budget_bytes'])} "
        f"({_pct(store['bytes'], store['budget_bytes'])}), {store['blobs']:,} blobs, "
        f"{store['evictions']:,} evicted since start"
        + (f"; {store['pins']} image(s) pinned, {human_size(store['pinned_bytes'])} held"
           if store.get("pins") else ""),
    )
    if swarm is None:
        grid.add_row("swarm", "off: no tracker configured (a plain pull-through mirror)")
    else:
        grid.add_row(
            "swarm",
            f"seeding {swarm['seeding']:,} blobs, {swarm['peers']:,} peers connected, "
            f"peer port {swarm['peer_port']}, tracker {swarm.get('tracker', '(admin only)')}",
        )
    got = moved["from_peers"] + moved["from_upstream"]
    grid.add_row(
        "blob bytes in",
        f"from peers {human_size(moved['from_peers'])} ({_pct(moved['from_peers'], got)}), "
        f"from upstream {human_size(moved['from_upstream'])} ({_pct(moved['from_upstream'], got)})",
    )
    grid.add_row(
        "blob bytes out",
        f"{human_size(moved['served'])} to clients, {doc['streams_active']} streams now",
    )
    fallbacks = ", ".join(f"{k} {v}" for k, v in sorted(fetches["fallbacks"].items()) if v)
    grid.add_row(
        "fetches",
        f"from peers {fetches['peers']:,}, from upstream {fetches['upstream']:,}, "
        f"joined {fetches['joined']:,}; fallbacks to upstream: {fallbacks or 'none'}",
    )
    if "recent" not in doc:
        grid.add_row("more", f"repositories and recent fetches need the admin token "
                     f"(--admin-token-file or ${ADMIN_TOKEN_ENV})")
        return [grid]
    pulls = Table(title="recent blob fetches", title_justify="left")
    for name, justify in (
        ("when", "right"), ("blob", "left"), ("repository", "left"), ("source", "left"),
        ("size", "right"), ("time", "right"),
    ):
        pulls.add_column(name, justify=justify)  # type: ignore[arg-type]
    now = time.time()
    for r in doc["recent"][:recent]:
        source = r["source"] if r["source"] != "failed" else "[red]failed[/red]"
        pulls.add_row(
            _ago(now - r["at_unix"]), r["digest"][:19], r["repository"], source,
            human_size(r["size"]), f"{r['seconds']:.2f} s",
        )
    return [grid, pulls, *pins_table(doc.get("pins") or [])]


def pins_table(pins: list[dict[str, Any]]) -> list[Table]:
    """Images the node never evicts (`p2preg preheat --pin`, `pinned_images`)."""
    if not pins:
        return []
    table = Table(title="pinned images (never evicted)", title_justify="left")
    for name, justify in (
        ("image", "left"), ("digest", "left"), ("bytes", "right"), ("held", "right"),
        ("pinned by", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in pins:
        held = human_size(p["held_bytes"])
        held = "all" if p["held_bytes"] >= p["bytes"] else f"[red]{held}[/red]"
        by = "config (pinned_images)" if p["source"] == "config" else "preheat --pin"
        table.add_row(p["image"], p["digest"][:19], human_size(p["bytes"]), held, by)
    return [table]


def containerd_table(finding: dict[str, Any]) -> Table:
    """This machine's containerd: do kubelet pulls reach the node?"""
    grid = Table(title="containerd on this machine", title_justify="left", show_header=False)
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("version", finding["version"])
    verdict = "[green]yes[/green]" if finding["ok"] else "[red]NO: they bypass the node[/red]"
    grid.add_row("kubelet pulls via node", verdict)
    grid.add_row("why", finding["reason"])
    if finding["add"]:
        grid.add_row("add, then restart", "\n".join(finding["add"]))
    return grid


def containerd_finding(args: argparse.Namespace, node: str | None) -> dict[str, Any] | None:
    """The containerd check for a node on this machine (or when its config is named)."""
    from p2preg.node.containerd_config import (
        DEFAULT_CONTAINERD_CONFIG,
        DEFAULT_HOSTS_DIR,
        check_host,
    )

    config = getattr(args, "containerd_config", None)
    version = getattr(args, "containerd_version", None)
    local = node is not None and urlsplit(node).hostname in ("127.0.0.1", "::1", "localhost")
    if config is None and version is None and not local:
        return None
    check = check_host(
        getattr(args, "host_root", None) or Path("/"),
        config or DEFAULT_CONTAINERD_CONFIG,
        getattr(args, "hosts_dir", None) or DEFAULT_HOSTS_DIR,
        version,
    )
    return check.as_json()


def _names_containerd(args: argparse.Namespace) -> bool:
    flags = ("containerd_config", "containerd_version", "hosts_dir", "host_root")
    return any(getattr(args, f, None) is not None for f in flags)


def tracker_tables(doc: dict[str, Any], url: str) -> list[Table]:
    """The tracker's totals and its busiest swarms."""
    grid = Table(title=f"tracker {url}", title_justify="left", show_header=False, min_width=60)
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    for key in ("swarms", "peers", "seeders", "metainfo", "leases"):
        grid.add_row(key, f"{doc[key]:,}")
    swarms = Table(title="busiest swarms", title_justify="left")
    for name, justify in (
        ("blob", "left"), ("size", "right"), ("seeders", "right"), ("leechers", "right"),
        ("completed", "right"), ("published by", "left"),
    ):
        swarms.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in doc["busiest"]:
        swarms.add_row(
            s["digest"][:19], human_size(s["size"]), str(s["seeders"]), str(s["leechers"]),
            str(s["completed"]), s["published_by"],
        )
    return [grid, swarms]


async def _read(
    node: str | None,
    trackers: list[str] | None,
    token: str | None,
    limit: int,
    admin: str | None,
    tls: ReloadingTLS | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The node's status, and the status of the first of `trackers` that answered (its URL)."""
    node_doc = tracker_doc = None
    answered = None
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
        if node is not None:
            r = await http.get(node + STATUS_PATH, headers=admin_headers(admin))
            r.raise_for_status()
            node_doc = r.json()
        if trackers and tls is not None:
            name = tls.identity.name
            async with open_tracker_client(trackers, node=name, tls=tls) as client:
                tracker_doc = await client.status(limit)
                answered = client.base_url
        elif trackers:
            client = TrackerClient(trackers, node="p2preg-status", token=token, http=http)
            tracker_doc = await client.status(limit)
            answered = client.base_url
    return node_doc, tracker_doc, answered


def add_arguments(p: argparse.ArgumentParser) -> None:
    from p2preg.node.containerd_config import default_node_url

    p.add_argument(
        "--node", metavar="URL", help=f"a node's facade (default {default_node_url()})"
    )
    p.add_argument("--tracker", metavar="URL", action="append",
                   help="the tracker (its token: --token-file or "
                   f"${TOKEN_ENV[0]}); repeatable: the first replica that answers")
    p.add_argument("--token-file", metavar="FILE", help="cluster token for the tracker")
    add_tls_argument(p)
    p.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help=f"the node's admin token, for repositories and recent fetches "
        f"(default ${ADMIN_TOKEN_ENV}, else /var/lib/p2preg/admin.token)",
    )
    p.add_argument("--recent", type=int, metavar="N", help="recent fetches listed (10)")
    p.add_argument("--limit", type=int, metavar="N", help="swarms listed (20)")
    p.add_argument("--json", action="store_true", help="print what was read, as JSON")
    p.add_argument("--containerd-config", type=Path, metavar="PATH",
                   help="this machine's containerd config, checked when the node is local "
                   "(/etc/containerd/config.toml)")
    p.add_argument("--containerd-version", metavar="VERSION",
                   help="containerd's version where `containerd --version` cannot run")
    p.add_argument("--hosts-dir", type=Path, metavar="DIR",
                   help="the hosts.toml directory containerd should read (/etc/containerd/certs.d)")
    p.add_argument("--host-root", type=Path, metavar="DIR",
                   help="where the host's / is mounted (in a pod: /host)")


def run(args: argparse.Namespace) -> int:
    from p2preg.node.containerd_config import default_node_url

    trackers = tracker_urls(args)
    node = getattr(args, "node", None)
    if node is None and trackers is None:
        node = default_node_url()
    node = node.rstrip("/") if node else None
    tls = read_tls(args, trackers) if trackers else None
    token = None if tls is not None else read_token(args)
    containerd = containerd_finding(args, node)
    try:
        admin = read_admin_token(getattr(args, "admin_token_file", None)) if node else None
        node_doc, tracker_doc, tracker = trio.run(
            _read, node, trackers, token, max(0, getattr(args, "limit", 20)), admin, tls
        )
    except (httpx.HTTPError, ValueError, tracker_errors.TrackerError) as e:
        print(f"p2preg status: {e}", file=sys.stderr)
        return 1
    if node_doc is not None and "containerd" in node_doc and not _names_containerd(args):
        # The node reads the host's config itself (containerd_config; in a pod the
        # host's /etc/containerd is mounted where this process's own is not).
        containerd = node_doc["containerd"]
    if getattr(args, "json", False):
        doc = {"node": node_doc, "tracker": tracker_doc}
        if containerd is not None:
            doc["containerd"] = containerd
        print(json.dumps(doc, indent=2))
        return 0
    console = Console()
    if containerd is not None:
        console.print(containerd_table(containerd))
    if node_doc is not None and node is not None:
        for table in node_tables(node_doc, node, max(0, getattr(args, "recent", 10))):
            console.print(table)
    if tracker_doc is not None and tracker is not None:
        for table in tracker_tables(tracker_doc, tracker):
            console.print(table)
    return 0
