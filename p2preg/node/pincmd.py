"""`p2preg unpin IMAGE…` and the pin step of `p2preg preheat --pin`: the operator's side of pins.

Owns asking a node's loopback admin endpoint (`POST|DELETE /_p2preg/pins?image=…`,
p2preg/node/pins.py) with the node's admin token, and turning its OCI error
into one line. What a pin holds and whether it fits is the node's decision;
this module must not resolve images itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import httpx
import trio

from p2preg.core.config import ConfigError
from p2preg.node.adminauth import ADMIN_TOKEN_ENV, admin_headers, read_admin_token
from p2preg.node.imagerefs import ImageRef, Platform, PreheatError, parse_image
from p2preg.node.pinbook import PINS_PATH


class NodeRefused(Exception):
    """The node answered a pin request with an error; the message is its own."""


def _message(r: httpx.Response) -> str:
    try:
        errors = r.json().get("errors")
        return str(errors[0]["message"])
    except (ValueError, AttributeError, LookupError, TypeError):
        return f"{r.status_code} {r.text[:200]}"


async def _ask(
    http: httpx.AsyncClient, method: str, node: str, params: Sequence[tuple[str, str]], admin: str
) -> dict[str, Any]:
    try:
        r = await http.request(
            method, node + PINS_PATH, params=tuple(params),
            headers=admin_headers(admin),
        )
    except httpx.HTTPError as e:
        raise NodeRefused(f"node {node}: {e!r}") from None
    if r.status_code != 200:
        raise NodeRefused(f"node {node}: {_message(r)}")
    doc: dict[str, Any] = r.json()
    return doc


async def pin(
    http: httpx.AsyncClient,
    node: str,
    image: ImageRef,
    platforms: Sequence[Platform] | None,
    admin: str,
) -> dict[str, Any]:
    """Pin `image` on `node` (it resolves, checks its budget and fetches); the node's answer."""
    params = [("image", str(image))]
    params += [("platform", str(p)) for p in platforms] if platforms is not None else [
        ("platform", "all")
    ]
    return await _ask(http, "POST", node, params, admin)


async def unpin(http: httpx.AsyncClient, node: str, image: ImageRef, admin: str) -> dict[str, Any]:
    return await _ask(http, "DELETE", node, [("image", str(image))], admin)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from p2preg.node.containerd_config import default_node_url

    p.add_argument("images", nargs="+", metavar="IMAGE", help="as pinned, e.g. ghcr.io/org/app:2.3")
    p.add_argument(
        "--node", action="append", metavar="URL",
        help=f"a node to unpin on (repeatable; default {default_node_url()})",
    )
    p.add_argument(
        "--admin-token-file", metavar="FILE",
        help=f"the node's admin token (default ${ADMIN_TOKEN_ENV}, else "
        "/var/lib/p2preg/admin.token)",
    )


def run(args: argparse.Namespace) -> int:
    from p2preg.node.containerd_config import default_node_url

    nodes = [n.rstrip("/") for n in getattr(args, "node", None) or [default_node_url()]]
    admin = read_admin_token(getattr(args, "admin_token_file", None))
    if admin is None:
        raise ConfigError(
            f"unpin needs the node's admin token: --admin-token-file FILE (or ${ADMIN_TOKEN_ENV})"
        )
    try:
        images = [parse_image(i) for i in args.images]
    except PreheatError as e:
        raise ConfigError(str(e)) from None

    async def unpin_all() -> list[str]:
        failed = []
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
            for node in nodes:
                for image in images:
                    try:
                        doc = await unpin(http, node, image, admin)
                    except NodeRefused as e:
                        failed.append(str(e))
                        continue
                    print(f"{node}: unpinned {doc['image']} ({doc['digest']}, "
                          f"{doc['bytes']} bytes): eviction may now take it")
        return failed

    failed = trio.run(unpin_all)
    for line in failed:
        print(f"p2preg unpin: {line}", file=sys.stderr)
    return 1 if failed else 0


async def pin_everywhere(
    http: httpx.AsyncClient,
    nodes: Sequence[str],
    images: Sequence[ImageRef],
    platforms: Sequence[Platform] | None,
    admin: str,
) -> dict[str, dict[str, str]]:
    """Pin every image on every node, before preheat fetches anything: node →
    blob digest → where the node got it. A refusal is a ConfigError (one line, exit 2)."""
    got: dict[str, dict[str, str]] = {}

    async def on(node: str) -> None:
        sources = got.setdefault(node, {})
        for image in images:
            try:
                doc = await pin(http, node, image, platforms, admin)
            except NodeRefused as e:
                raise ConfigError(str(e)) from None
            sources.update(doc.get("sources") or {})

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(on, node)
    return got
