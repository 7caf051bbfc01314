"""The node's own endpoints beside the registry API: status, preheat, metrics listener.

Owns `GET /_p2preg/status` (a JSON snapshot of the node, what `p2preg status`
shows), `POST /_p2preg/preheat/<name>/blobs/<digest>?ns=` (bring a blob into
the store and the swarm without sending its bytes anywhere, what `p2preg
preheat` asks of each node), and the small app of the optional metrics
listener (`/healthz` and `/metrics` only). The first two are added to the
facade's app, on its loopback listener: they are exactly as reachable as a
pull, and a client that can pull a blob can already make the node fetch it.
Preheat goes through the same tenancy check and single-flight fetch as a pull.
This module must not decide where a blob comes from (blobs.py does).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from quart import Response, g, request
from quart_trio import QuartTrio

from p2preg import __version__
from p2preg.node.errors import Denied, NotFound
from p2preg.node.routes import Kind, parse_route

if TYPE_CHECKING:
    from p2preg.node.server import Node

STATUS_PATH = "/_p2preg/status"
PREHEAT_PREFIX = "/_p2preg/preheat/"


def _json(doc: object, status: int = 200) -> Response:
    return Response(json.dumps(doc).encode(), status, {"Content-Type": "application/json"})


def add_routes(app: QuartTrio, node: Node) -> None:
    """Add the status and preheat endpoints to the facade's app."""
    started = time.time()

    @app.route(STATUS_PATH, methods=["GET"])
    async def status() -> Response:
        g.route = "status"
        return _json(status_doc(node, started))

    @app.route(PREHEAT_PREFIX + "<path:path>", methods=["POST"])
    async def preheat(path: str) -> Response:
        g.route = "preheat"
        route = parse_route("GET", "/v2/" + path)
        if route.kind is not Kind.BLOB:
            raise NotFound(f"preheat takes {PREHEAT_PREFIX}<name>/blobs/<digest>")
        ns = request.args.get("ns")
        client = node.client_for(ns)
        if client is None:
            raise Denied(f"registry {(ns or '')[:100]!r} is not mirrored by this node")
        digest = route.digest
        held = digest in node.store
        await node.blobs.authorize(client, route.name, digest)
        await node.blobs.ensure(client, route.name, digest)
        source = "store"
        if not held:
            fetched = [r for r in node.blobs.recent if r.digest == str(digest)]
            source = fetched[-1].source if fetched else "store"
        seeding = node.p2p is not None and digest in node.p2p.swarm.seeding()
        return _json(
            {
                "digest": str(digest),
                "size": node.store.size(digest) or 0,
                "source": source,
                "seeding": seeding,
                "p2p_min_bytes": node.config.p2p_min_bytes if node.p2p is not None else None,
            }
        )


def status_doc(node: Node, started_unix: float) -> dict[str, object]:
    """Everything `p2preg status` shows about a node, as plain JSON values."""
    node.refresh_gauges()
    sample = node.metrics.registry.get_sample_value

    def count(name: str, **labels: str) -> int:
        return int(sample(name, labels) or 0)

    fallbacks = {
        s.labels["reason"]: int(s.value)
        for family in node.metrics.fallbacks.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    config, store, p2p = node.config, node.store, node.p2p
    swarm: dict[str, object] | None = None
    if p2p is not None:
        swarm = {
            "tracker": config.tracker,
            "seeding": len(p2p.swarm.seeding()),
            "peers": p2p.swarm.peers(),
            "peer_port": p2p.swarm.listen_port,
        }
    return {
        "node": p2p.tracker.node if p2p is not None else (config.node_name or socket.gethostname()),
        "version": __version__,
        "uptime_s": round(time.time() - started_unix, 1),
        "upstreams": [{"ns": u.ns, "url": u.url} for u in config.upstream],
        "store": {
            "bytes": store.used_bytes,
            "budget_bytes": store.max_bytes,
            "blobs": len(store),
            "evictions": store.evictions,
        },
        "swarm": swarm,
        "bytes": {
            "from_peers": count("p2preg_peer_blob_bytes_total"),
            "from_upstream": count("p2preg_upstream_blob_bytes_total"),
            "served": count("p2preg_blob_bytes_served_total"),
        },
        "fetches": {
            "peers": count("p2preg_blob_fetches_total", source="peers"),
            "upstream": count("p2preg_blob_fetches_total", source="upstream"),
            "joined": count("p2preg_blob_fetch_joins_total"),
            "fallbacks": fallbacks,
        },
        "streams_active": count("p2preg_blob_streams_active"),
        "recent": [asdict(r) for r in reversed(node.blobs.recent)],
    }


def create_metrics_app(node: Node) -> QuartTrio:
    """The metrics listener's app: `/healthz` and `/metrics`, nothing of the registry."""
    app = QuartTrio("p2preg.node.metrics")

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return Response(b"ok\n", 200, {"Content-Type": "text/plain"})

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        node.refresh_gauges()
        return Response(
            node.metrics.exposition(), 200, {"Content-Type": "text/plain; version=0.0.4"}
        )

    return app
