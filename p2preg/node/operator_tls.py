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
from pathlib import Path

from p2preg.core.config import ConfigError
from p2preg.core.tls import ReloadingTLS

TLS_DIR_ENV = "P2PREG_TLS_DIR"


def needs_tls_dir(tracker_url: str) -> str:
    return (f"the tracker {tracker_url} wants a client certificate: give --tls-dir DIR "
            f"(a node's tls_dir, or ${TLS_DIR_ENV})")


def read_tls(args: argparse.Namespace, tracker_url: str | None) -> ReloadingTLS | None:
    """The node certificate a mutual-TLS tracker wants: --tls-dir, else $P2PREG_TLS_DIR.

    A tracker URL given as https:// without one is a one-line error here, not a
    TLS failure later; so is a certificate beside a cluster token.
    """
    given = getattr(args, "tls_dir", None) or os.environ.get(TLS_DIR_ENV) or None
    if given is None:
        if tracker_url is not None and tracker_url.startswith("https://"):
            raise ConfigError(needs_tls_dir(tracker_url))
        return None
    if getattr(args, "token_file", None) is not None:
        raise ConfigError("give --tls-dir or --token-file, not both: a cluster is one or the other")
    return ReloadingTLS(Path(given), role="node")


def add_tls_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", metavar="DIR", help="a node's tls_dir (tls.crt, tls.key, "
                   f"ca.crt), for a mutual-TLS tracker (default ${TLS_DIR_ENV})")
