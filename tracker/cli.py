"""`p2preg tracker`: flags, configuration loading, and running the tracker.

Owns the command line of the tracker subcommand only; everything it accepts is
a TrackerConfig field, so the same names work as P2PREG_* variables and TOML
keys. It must not start anything but `serve_tracker`, which it stops on SIGTERM
or SIGINT (as PID 1 of a container, a process without a handler would ignore
SIGTERM and wait out the kill timeout); every state change is already on disk.
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
from tracker.config import TrackerConfig
from tracker.serve import serve_tracker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with TrackerConfig keys")
    parser.add_argument("--listen", help="HOST:PORT for HTTP and UDP (default 127.0.0.1:6969)")
    _add_store_arguments(parser)
    # No --token: a command line is readable by every local user (/proc/<pid>/cmdline).
    parser.add_argument(
        "--token-file", help="file holding the cluster token (or P2PREG_TOKEN in the environment)"
    )
    parser.add_argument(
        "--udp",
        action=argparse.BooleanOptionalAction,
        help="serve BEP 15 UDP (default: on, off with --tls-dir)",
    )
    parser.add_argument("--announce-interval-s", help="announce interval, seconds")
    parser.add_argument("--min-announce-interval-s", help="minimum announce interval, seconds")
    parser.add_argument("--peer-ttl-s", help="drop peers silent for this long, seconds")
    parser.add_argument("--seeder-announce-interval-s", help="known seeders' interval (±10 %%)")
    _add_lease_arguments(parser)
    parser.add_argument(
        "--dispute-quarantine-s",
        help="how long a node whose torrent lost a dispute may not define torrents, seconds",
    )
    parser.add_argument("--max-numwant", help="cap on peers per announce reply")
    parser.add_argument(
        "--stall-reporters", help="identities whose stall reports delist a peer (at least 2)"
    )
    parser.add_argument("--stall-window-s", help="how long a stall report counts, seconds")
    parser.add_argument("--stall-cooloff-s", help="how long a delisted peer is not handed out")
    parser.add_argument("--max-metainfo-bytes", help="largest accepted metainfo, e.g. 1MiB")
    parser.add_argument("--max-manifests", help="manifest bodies the tracker keeps, at most")
    parser.add_argument("--max-manifest-store-bytes", help="their bytes, at most, e.g. 256MiB")
    parser.add_argument(
        "--trusted-ip-sources",
        help="comma-separated CIDRs allowed to set a peer's IP with ip=",
    )
    for kind in ("publish", "report", "lease"):
        parser.add_argument(f"--quota-{kind}-per-s", help=f"{kind} requests a second, per node")
        parser.add_argument(f"--quota-{kind}-burst", help=f"{kind} requests saved up, per node")
    parser.add_argument(
        "--metainfo-idle-expiry-s", help="forget metainfo nobody announced for this long, seconds"
    )
    parser.add_argument(
        "--pinned-digests", help="comma-separated digests whose metainfo never expires"
    )
    parser.add_argument(
        "--max-preauth-connections", help="connections not yet past a request or handshake"
    )
    parser.add_argument(
        "--max-preauth-connections-per-ip", help="the same, per client address"
    )
    parser.add_argument("--max-long-polls", help="lease requests held open at once")
    parser.add_argument(
        "--max-long-polls-per-identity", help="lease requests held open at once, per node"
    )
    parser.add_argument(
        "--tls-dir", help="cluster identity: tls.crt, tls.key, ca.crt (cert-manager layout)"
    )
    parser.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="no TLS: plain HTTP, token auth (a trusted network only)",
    )
    _add_side_listeners(parser)
    parser.add_argument("--log-level", help="logging level (default INFO)")
    parser.add_argument("--log-json", action="store_const", const=True, help="JSON log lines")


def _add_lease_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream-fetch leases: how long, how fast, how many."""
    parser.add_argument("--lease-ttl-s", help="upstream lease lifetime without renewal, seconds")
    parser.add_argument("--lease-wait-max-s", help="longest lease long-poll, seconds")
    parser.add_argument(
        "--lease-min-rate-bytes-s",
        help="progress a lease holder must keep up, bytes/s (0: none); below it, "
        "the next node asking takes the fetch over",
    )
    parser.add_argument(
        "--lease-rate-window-s", help="window over which that rate is measured, seconds"
    )
    parser.add_argument("--lease-silence-s", help="take over from a holder silent this long, s")
    parser.add_argument(
        "--lease-grant-ack-s", help="pass on a grant its holder did not renew this soon, s"
    )
    parser.add_argument("--max-leases-per-node", help="open leases one node may hold at once")
    parser.add_argument(
        "--upstream-fetches-per-image",
        help="blobs of one image fetched from upstream at once, in manifest order (0: no limit)",
    )
    parser.add_argument(
        "--upstream-handoff-s",
        help="start an image's next upstream fetch this long before the last one's "
        "predicted last byte, s (0: off)",
    )


def _add_side_listeners(parser: argparse.ArgumentParser) -> None:
    """The plain listeners beside the tracker's port."""
    parser.add_argument(
        "--metrics-listen", help="HOST:PORT of a plain listener with /metrics and /healthz only"
    )
    parser.add_argument(
        "--admin-listen",
        help="loopback HOST:PORT of the read-only cluster page (no auth: loopback only)",
    )


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="directory of the metainfo and lease store")
    parser.add_argument(
        "--store",
        help="keep state in Redis: redis://H:P/DB, rediss://H:P/DB or "
        "redis+sentinel://H1:P1,H2:P2/SERVICE (default: SQLite in --data-dir)",
    )
    # No --store-password: a command line is readable by every local user.
    parser.add_argument(
        "--store-password-file",
        help="file holding the store's password (or P2PREG_STORE_PASSWORD in the environment)",
    )
    parser.add_argument("--store-ca-file", help="CA file for a rediss:// store's certificate")
    parser.add_argument(
        "--replica-term-s", help="with --store: how long a serving replica's term lasts, seconds"
    )
    parser.add_argument(
        "--replica-advertise",
        help="with --store: HOST:PORT the other replicas reach this one on (default: --listen "
        "if it names one address)",
    )


def config_from_args(args: argparse.Namespace) -> TrackerConfig:
    given = {
        k: v
        for k, v in vars(args).items()
        if k not in ("_module", "command", "config", "log_level")
    }
    return load(
        TrackerConfig,
        cli=given,
        env=os.environ,
        file=getattr(args, "config", None),
    )


def run(args: argparse.Namespace) -> int:
    # The store and the UDP key are the tracker user's alone (hostfiles.py).
    private_umask()
    config = config_from_args(args)
    setup_logging(json_lines=config.log_json, level=log_level(getattr(args, "log_level", None)))
    trio.run(serve_until_signalled, config)
    return 0


async def serve_until_signalled(config: TrackerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_tracker, config)
            async for signum in signals:
                logging.getLogger("p2preg.tracker").info(
                    "tracker: %s received: stopping", signal.Signals(signum).name
                )
                nursery.cancel_scope.cancel()
                break
