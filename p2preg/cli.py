"""The `p2preg` console script: one subcommand per deployable.

Each subcommand lives in the module that owns the component and exposes
`add_arguments(parser)` and `run(args) -> int`. This module only dispatches and
turns a configuration error into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from p2preg.core.config import ConfigError

SUBCOMMANDS = {
    "node": ("p2preg.node.cli", "run a node: the registry facade containerd pulls from"),
    "tracker": ("tracker.cli", "run the cluster tracker: announces, metainfo, upstream leases"),
    "containerd-config": (
        "p2preg.node.containerd_config",
        "write containerd hosts.toml files that send pulls to the node, upstream as fallback",
    ),
    "registries-conf": (
        "p2preg.node.registries_conf",
        "write podman/CRI-O registries.conf or k3s/RKE2 registries.yaml mirror entries",
    ),
    "preheat": ("p2preg.node.preheat", "fetch images into the swarm ahead of a deploy"),
    "status": ("p2preg.node.status", "show a node's or the tracker's state"),
    "unpin": ("p2preg.node.pincmd", "remove an image pinned by `p2preg preheat --pin`"),
    "limits": ("p2preg.node.limits_cli", "show or change a running node's bandwidth caps"),
    "ca": ("p2preg.ca", "make a cluster CA and issue node and tracker certificates"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="p2preg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        # No abbreviations: `--token S3CRET` must not become `--token-file S3CRET`
        # (and an error message quoting it).
        p = sub.add_parser(
            name, help=help_text, argument_default=argparse.SUPPRESS, allow_abbrev=False
        )
        p.set_defaults(_module=module)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A node need not import the tracker's modules, nor the tracker the node's.
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        status: int = module.run(args)
    except ConfigError as e:
        print(f"p2preg {args.command}: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # A service's nursery wraps the ConfigError its start-up raised.
        errors, rest = group.split(ConfigError)
        if errors is None or rest is not None:
            raise
        first: BaseException = errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"p2preg {args.command}: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
