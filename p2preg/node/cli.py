"""`p2preg node`: flags, configuration loading and the trio entry point.

The entry point turns SIGTERM (and SIGINT) into a graceful shutdown of the
node (`serve_node`'s `shutdown` event); a second signal stops it at once.
It must not build any part of the node (server.py does).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import trio

from p2preg.core.config import load
from p2preg.core.hostfiles import private_umask
from p2preg.core.logs import log_level, setup_logging
from p2preg.node.config import NodeConfig
from p2preg.node.server import serve_node


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    p.add_argument("--listen", metavar="HOST:PORT", help="facade address (127.0.0.1:5000)")
    p.add_argument(
        "--upstream",
        metavar="[NS=]URL",
        action="append",
        help="seed registry; NS is the name containerd sends as ?ns= (repeatable; the "
        "first also serves requests without ns)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="blob store and state (/var/lib/p2preg)")
    p.add_argument(
        "--tracker",
        metavar="URL",
        action="append",
        help="tracker base URL, http(s)://host:port (repeatable: replicas of one cluster, "
        "tried in this order)",
    )
    p.add_argument("--peer-port", metavar="N", help="BitTorrent listen port (6881)")
    p.add_argument("--peer-host", metavar="ADDR", help="BitTorrent listen address (0.0.0.0)")
    p.add_argument(
        "--peer-ssl-port", metavar="N", help="BitTorrent over TLS port, with --tls-dir (6882)"
    )
    p.add_argument("--node-name", metavar="NAME", help="name the tracker knows this node by")
    p.add_argument(
        "--p2p-min-bytes", metavar="SIZE", help="smaller blobs come straight from upstream (1MiB)"
    )
    _add_chunk_arguments(p)
    _add_cache_arguments(p)
    p.add_argument("--max-blob-streams", metavar="N", help="concurrent blob responses (64)")
    p.add_argument(
        "--peer-stall-report-s", metavar="SECONDS",
        help="report a peer that unchoked us and was asked but sent no block this long (10)",
    )
    p.add_argument("--log-json", action="store_const", const=True, help="JSON log lines")
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="a second listener: /metrics, /healthz only"
    )
    p.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="cluster identity: tls.crt, tls.key, ca.crt (cert-manager layout; `p2preg ca issue`)",
    )
    p.add_argument(
        "--insecure", action="store_const", const=True,
        help="no TLS: plain tracker link and peer wire (a token cluster on a trusted network)",
    )
    p.add_argument(
        "--tracker-token-file",
        metavar="FILE",
        help="the cluster token for the tracker (token clusters; never give it on the "
        "command line, which every local user can read)",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="the admin token for preheat and the full status (default: a new "
        "<data-dir>/admin.token at every start)",
    )
    p.add_argument(
        "--credentials-file",
        metavar="FILE",
        help="registry credentials, TOML or JSON: NS = {username, password}; mode 0600",
    )
    p.add_argument(
        "--trusted-realms",
        metavar="NS=HOST",
        action="append",
        help="a token realm host that may get NS's credentials besides NS's own host "
        "(repeatable; e.g. docker.io=auth.docker.io)",
    )
    _add_containerd_arguments(p)
    _add_limit_arguments(p)
    p.add_argument("--log-level", help="logging level (default INFO)")
    p.add_argument(
        "--shutdown-grace-s",
        metavar="SECONDS",
        help="on SIGTERM, how long responses in flight may take to finish (10)",
    )


def _add_chunk_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-bytes", metavar="SIZE",
        help="chunk torrents of blobs fetched upstream are this large (4MiB)",
    )
    p.add_argument(
        "--chunk-min-count", metavar="N", help="blobs of fewer chunks move whole (2)"
    )
    p.add_argument(
        "--no-chunking", dest="chunking", action="store_const", const=False,
        help="move every blob as one torrent, once its first copy is verified",
    )


def _add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-max-bytes", metavar="SIZE", help="store budget, e.g. 50GiB")
    p.add_argument(
        "--pinned-images", metavar="IMAGE", action="append",
        help="an image never evicted from the store, this machine's platform (repeatable)",
    )
    p.add_argument("--tag-ttl-s", metavar="SECONDS", help="how long a tag → digest answer is kept")
    p.add_argument(
        "--serve-stale-s", metavar="SECONDS",
        help="while upstream is down, answer a tag seen this recently (7 days; 0: never)",
    )
    p.add_argument(
        "--no-cluster-fallback", dest="cluster_fallback", action="store_const", const=False,
        help="while upstream is down, take nothing on another node's word (tags, manifests): "
        "a clean 503 instead",
    )


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--relay-refresh-s", metavar="SECONDS",
        help="send the seeder refreshes the announce relay answered itself this often (30)",
    )
    for key, what in (("peer-upload", "peers get from this node"),
                      ("peer-download", "this node takes from peers"),
                      ("upstream-download", "this node takes from upstream")):
        p.add_argument(f"--{key}-limit-bytes-s", metavar="RATE",
                       help=f"cap on what {what}, e.g. 10MiB or 80Mbit per second (0: none)")


def _add_containerd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--containerd-config",
        metavar="PATH",
        help="containerd's config.toml as this node sees it: report whether kubelet pulls "
        "reach the node (p2preg_containerd_config_ok)",
    )
    p.add_argument(
        "--containerd-version",
        metavar="VERSION",
        help="containerd's version where `containerd --version` cannot run (2.1.3)",
    )
    p.add_argument(
        "--containerd-hosts-dir",
        metavar="DIR",
        help="the hosts.toml directory as containerd names it (/etc/containerd/certs.d)",
    )


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    cli = {
        k: v
        for k, v in vars(args).items()
        if not k.startswith("_") and k not in ("command", "config", "log_level")
    }
    trackers = cli.pop("tracker", None)
    if isinstance(trackers, list) and len(trackers) > 1:
        cli["trackers"] = trackers
    elif isinstance(trackers, list | str):
        cli["tracker"] = trackers[0] if isinstance(trackers, list) else trackers
    return load(
        NodeConfig,
        cli=cli,
        env=os.environ,
        file=getattr(args, "config", None),
    )


def run(args: argparse.Namespace) -> int:
    # What libtorrent and the store create is the node user's alone (hostfiles.py).
    private_umask()
    config = config_from_args(args)
    config.check_serving()  # before any log line: a refusal is one line on stderr
    setup_logging(json_lines=config.log_json, level=log_level(getattr(args, "log_level", None)))
    logging.getLogger(__name__).info(
        "node: upstreams %s", ", ".join(f"{u.ns}={u.url}" for u in config.upstream)
    )
    trio.run(serve_until_signalled, config)
    return 0


async def serve_until_signalled(config: NodeConfig) -> None:
    """Serve; the first SIGTERM or SIGINT drains the node, a second one stops it now."""
    log = logging.getLogger(__name__)
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if shutdown.is_set():
                        log.warning("node: second %s: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("node: %s received", name)
                    shutdown.set()

            nursery.start_soon(watch)
            await serve_node(config, shutdown=shutdown)
            nursery.cancel_scope.cancel()
