"""The node's own endpoints beside the registry API: status, preheat, metrics listener.

Owns `GET /_p2preg/status` (a JSON snapshot of the node, what `p2preg status`
shows), `POST /_p2preg/preheat/<name>/blobs/<digest>?ns=` (bring a blob into
the store and the swarm without sending its bytes anywhere, what `p2preg
preheat` asks of each node), and the small app of the optional metrics
listener (`/healthz` and `/metrics` only). The first two are added to the
facade's app, on its loopback listener, where any local process may reach
them: so preheat needs the node's admin credential (adminauth.py) and
answers 401 without it, and the status shows only counts to a caller without
it — repository names and fetch history tell a local process which private
images the host runs. Preheat goes through the same tenancy check and
single-flight fetch as a pull. This module must not decide where a blob
comes from (fetch.py does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from quart import Response, g, request
from quart_trio import QuartTrio

from p2preg import __version__
from p2preg.node.adminauth import AdminAuth
from p2preg.node.blobs import Blobs
from p2preg.node.config import Upstream
from p2preg.node.errors import AdminUnauthorized, Denied, NotFound
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pins import Pins
from p2preg.node.routes import Kind, parse_route
from p2preg.node.seams import SwarmSeam
from p2preg.node.store import BlobStore
from p2preg.node.upstream import Upstreams

STATUS_PATH = "/_p2preg/status"
PREHEAT_PREFIX = "/_p2preg/preheat/"


def _json(doc: object, status: int = 200) -> Response:
    return Response(json.dumps(doc).encode(), status, {"Content-Type": "application/json"})


@dataclass(frozen=True)
class Admin:
    """What the node's endpoints read; `swarm` is None and `trackers` empty without a tracker."""

    name: str
    upstreams: Upstreams
    store: BlobStore
    blobs: Blobs
    metrics: NodeMetrics
    swarm: SwarmSeam | None
    trackers: tuple[str, ...]
    p2p_min_bytes: int
    auth: AdminAuth
    pins: Pins | None = None


def add_routes(app: QuartTrio, admin: Admin) -> None:
    """Add the status, preheat, health and metrics endpoints to the facade's app."""
    started = time.time()
    add_health_routes(app, admin.metrics, admin.store)

    @app.route(STATUS_PATH, methods=["GET"])
    async def status() -> Response:
        g.route = "status"
        full = admin.auth.allows(request.headers.get("Authorization"))
        return _json(status_doc(admin, started, full=full))

    @app.route(PREHEAT_PREFIX + "<path:path>", methods=["POST"])
    async def preheat(path: str) -> Response:
        g.route = "preheat"
        if not admin.auth.allows(request.headers.get("Authorization")):
            raise AdminUnauthorized("preheat needs the node's admin token (admin.token)")
        route = parse_route("GET", "/v2/" + path)
        if route.kind is not Kind.BLOB:
            raise NotFound(f"preheat takes {PREHEAT_PREFIX}<name>/blobs/<digest>")
        ns = request.args.get("ns")
        client = admin.upstreams.client_for(ns)
        if client is None:
            raise Denied(f"registry {(ns or '')[:100]!r} is not mirrored by this node")
        digest = route.digest
        held = digest in admin.store
        await admin.blobs.ensure(client, route.name, digest)
        source = "store"
        if not held:
            fetched = [r for r in admin.blobs.recent if r.digest == str(digest)]
            source = fetched[-1].source if fetched else "store"
        swarm = admin.swarm
        return _json(
            {
                "digest": str(digest),
                "size": admin.store.size(digest) or 0,
                "source": source,
                "seeding": swarm is not None and digest in swarm.seeding(),
                "p2p_min_bytes": admin.p2p_min_bytes if swarm is not None else None,
            }
        )


def _upstreams(upstreams: Sequence[Upstream]) -> list[dict[str, str]]:
    return [{"ns": u.ns, "url": u.url} for u in upstreams]


def status_doc(admin: Admin, started_unix: float, *, full: bool) -> dict[str, object]:
    """What `p2preg status` shows about a node, as plain JSON values.

    Without `full` (no admin token) only counts: no repository, digest or URL.
    """
    metrics, store, swarm = admin.metrics, admin.store, admin.swarm
    metrics.refresh(store)
    sample = metrics.registry.get_sample_value

    def count(name: str, **labels: str) -> int:
        return int(sample(name, labels) or 0)

    fallbacks = {
        s.labels["reason"]: int(s.value)
        for family in metrics.fallbacks.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    swarm_doc: dict[str, object] | None = None
    if swarm is not None:
        swarm_doc = {
            "seeding": len(swarm.seeding()),
            "peers": swarm.peers(),
            "peer_port": swarm.listen_port,
        }
        if full:
            swarm_doc["tracker"] = admin.trackers[0] if admin.trackers else None
            swarm_doc["trackers"] = list(admin.trackers)
    doc: dict[str, object] = {
        "node": admin.name,
        "version": __version__,
        "uptime_s": round(time.time() - started_unix, 1),
        "full": full,
        "store": {
            "bytes": store.used_bytes,
            "budget_bytes": store.max_bytes,
            "blobs": len(store),
            "evictions": store.evictions,
            "pinned_bytes": store.pinned_bytes,
            "pins": 0 if admin.pins is None else len(admin.pins),
        },
        "swarm": swarm_doc,
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
    }
    if metrics.containerd is not None:
        doc["containerd"] = metrics.containerd
    if full:
        doc["upstreams"] = _upstreams(admin.upstreams.upstreams)
        doc["recent"] = [asdict(r) for r in reversed(admin.blobs.recent)]
        doc["pins"] = [] if admin.pins is None else admin.pins.listing()
    return doc


def add_health_routes(app: QuartTrio, metrics: NodeMetrics, store: BlobStore) -> None:
    """`/healthz` and `/metrics`, on the facade and on the metrics listener alike."""

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return Response(b"ok\n", 200, {"Content-Type": "text/plain"})

    @app.route("/metrics", methods=["GET"])
    async def exposition() -> Response:
        metrics.refresh(store)
        return Response(metrics.exposition(), 200, {"Content-Type": "text/plain; version=0.0.4"})


def create_metrics_app(metrics: NodeMetrics, store: BlobStore) -> QuartTrio:
    """The metrics listener's app: `/healthz` and `/metrics`, nothing of the registry."""
    app = QuartTrio("p2preg.node.metrics")
    add_health_routes(app, metrics, store)
    return app
