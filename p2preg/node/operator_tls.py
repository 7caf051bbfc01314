"""The client certificate `p2preg status` and `p2preg preheat` show a mutual-TLS tracker.

Owns the `--tls-dir DIR` flag of the operator commands (a node's tls_dir: the
commands talk to the tracker as that node, since the tracker admits node
certificates only), its `$P2PREG_TLS_DIR` default, and the one-line errors when
an https:// tracker is named without one or beside a cluster token. It must
not talk to anything: the commands build their tracker client from what it
returns.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from p2preg.core.config import ConfigError
from p2preg.core.tls import ReloadingTLS
from p2preg.node.config import check_tracker_urls

TLS_DIR_ENV = "P2PREG_TLS_DIR"


def needs_tls_dir(tracker_url: str) -> str:
    return (f"the tracker {tracker_url} wants a client certificate: give --tls-dir DIR "
            f"(a node's tls_dir, or ${TLS_DIR_ENV})")


def tracker_urls(args: argparse.Namespace) -> list[str] | None:
    """The `--tracker` URLs given (repeatable: one cluster's replicas), None if none."""
    given = getattr(args, "tracker", None)
    if isinstance(given, str):
        given = [given]
    return [u.rstrip("/") for u in given] if given else None


def read_tls(args: argparse.Namespace, trackers: Sequence[str] | None) -> ReloadingTLS | None:
    """The node certificate a mutual-TLS tracker wants: --tls-dir, else $P2PREG_TLS_DIR.

    A tracker URL given as https:// without one is a one-line error here, not a
    TLS failure later; so is a certificate beside a cluster token, and trackers
    that mix http and https.
    """
    given = getattr(args, "tls_dir", None) or os.environ.get(TLS_DIR_ENV) or None
    if trackers:
        check_tracker_urls(tuple(trackers))
    if given is None:
        if trackers and trackers[0].startswith("https://"):
            raise ConfigError(needs_tls_dir(trackers[0]))
        return None
    if getattr(args, "token_file", None) is not None:
        raise ConfigError("give --tls-dir or --token-file, not both: a cluster is one or the other")
    return ReloadingTLS(Path(given), role="node")


def add_tls_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", metavar="DIR", help="a node's tls_dir (tls.crt, tls.key, "
                   f"ca.crt), for a mutual-TLS tracker (default ${TLS_DIR_ENV})")
