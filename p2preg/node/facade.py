"""The registry facade: the OCI distribution pull API over HTTP (quart-trio).

This layer only moves bytes: it parses the request with the sans-IO route and
range parsers, asks the resolver for manifests and `Blobs` for blobs, and writes
responses. Every `RegistryError` becomes an OCI JSON error in one handler;
nothing a client sends can produce a 5xx. Blob bodies stream from the verified
store (blobstream.py), the number of open streams capped. It gets exactly the
parts it uses at construction and must not decide where a blob comes from,
fetch anything itself, or know of the swarm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from p2preg.node.blobs import Blobs
from p2preg.node.blobstream import BlobBody, BlobStreams
from p2preg.node.errors import Denied, PaginationInvalid, RegistryError
from p2preg.node.httprange import ByteRange, parse_range
from p2preg.node.hypercorn_internals import ZeroCopyConnection
from p2preg.node.manifest import OCI_INDEX, forwarded_accept
from p2preg.node.resolver import Manifest, ManifestHead, Resolver
from p2preg.node.routes import Kind, Route, parse_route
from p2preg.node.seams import UpstreamSeam
from p2preg.node.upstream import Upstreams

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_TAGS_PAGE = 10_000


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(doc).encode()
    return Response(body, status, {"Content-Type": "application/json", **(headers or {})})


@dataclass(frozen=True)
class Registry:
    """What the registry routes read: the mirrored upstreams, manifests, blobs and their bodies."""

    upstreams: Upstreams
    resolver: Resolver
    blobs: Blobs
    streams: BlobStreams


def create_app(registry: Registry) -> QuartTrio:
    """The facade's app; the node adds its own endpoints (admin.py) beside the registry's."""
    app = QuartTrio(__name__)
    app.asgi_http_class = ZeroCopyConnection  # blob bodies go out zero-copy where the server can
    # Blob streams last as long as the client reads; the node caps their number.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = 0
    metrics = registry.streams.metrics
    @app.route("/", defaults={"path": ""}, methods=ALL_METHODS)
    @app.route("/<path:path>", methods=ALL_METHODS)
    async def serve(path: str) -> Response:
        ns = request.args.get("ns")
        # ?ns= (containerd) names the upstream; without it the path may (routes.py).
        route = parse_route(request.method, request.path, () if ns else registry.upstreams.names)
        g.route = route.kind.value
        client = _client(registry.upstreams, ns or route.upstream)
        head = request.method == "HEAD"
        match route.kind:
            case Kind.BASE:
                return _json({})
            case Kind.MANIFEST:
                return await _manifest(registry.resolver, client, route, head)
            case Kind.BLOB:
                return await _blob(registry, client, route, head)
            case Kind.TAGS:
                return await _tags(registry.resolver, client, route)
            case Kind.REFERRERS:
                return await _referrers(registry.resolver, client, route)

    @app.errorhandler(RegistryError)
    async def registry_error(e: RegistryError) -> Response:
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e.message)
        return Response(e.body(), e.status, {"Content-Type": "application/json", **e.headers})

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        code = "UNSUPPORTED" if e.code == 405 else "NOT_FOUND" if e.code == 404 else "UNKNOWN"
        body = {"errors": [{"code": code, "message": e.description or e.name}]}
        return _json(body, e.code or 400)

    @app.after_request
    async def count(response: Response) -> Response:
        if request.path.startswith("/v2"):
            response.headers.update(API_VERSION)
        metrics.requests.labels(g.get("route", "other"), str(response.status_code)).inc()
        return response

    return app


def _client(upstreams: Upstreams, ns: str | None) -> UpstreamSeam:
    client = upstreams.client_for(ns)
    if client is None:
        # Refused at once: containerd falls back to its next host, and the node
        # never becomes an open proxy to registries it was not given.
        raise Denied(f"registry {ns[:100]!r} is not mirrored by this node" if ns else "no registry")
    return client


async def _manifest(
    resolver: Resolver, client: UpstreamSeam, route: Route, head: bool
) -> Response:
    assert route.reference is not None
    # Go clients (skopeo, containerd) send one Accept header per media type.
    accept = forwarded_accept(request.headers.getlist("Accept"))
    # A HEAD of a tag is answered from upstream's HEAD (resolver.py): no pull counted upstream.
    if head:
        found: Manifest | ManifestHead = await resolver.head(
            client, route.name, route.reference, accept
        )
    else:
        found = await resolver.manifest(client, route.name, route.reference, accept)
    headers = {
        "Content-Type": found.media_type,
        "Docker-Content-Digest": str(found.digest),
        "ETag": f'"{found.digest}"',
    }
    body = found.body if isinstance(found, Manifest) and not head else b""
    response = Response(body, 200, headers)
    response.headers["Content-Length"] = str(found.size)
    return response


async def _blob(registry: Registry, client: UpstreamSeam, route: Route, head: bool) -> Response:
    digest = route.digest
    headers = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }
    blobs, store = registry.blobs, registry.streams.store
    if head:
        size = await blobs.size(client, route.name, digest)
        response = Response(b"", 200, headers)
        response.headers["Content-Length"] = str(size)
        return response
    await blobs.ensure(client, route.name, digest)
    stored = store.size(digest)
    if stored is None:  # evicted between the fetch and now: fetch again
        await blobs.ensure(client, route.name, digest)
        stored = store.size(digest) or 0
    size = stored
    rng = parse_range(request.headers.get("Range"), size)
    status = 200
    if rng is None:
        rng = ByteRange(0, size - 1)
    else:
        status = 206
        headers["Content-Range"] = rng.content_range(size)
    response = Response(BlobBody(registry.streams, digest, rng), status, headers)
    response.headers["Content-Length"] = str(rng.length)
    response.timeout = None
    return response


async def _tags(resolver: Resolver, client: UpstreamSeam, route: Route) -> Response:
    n_text, last = request.args.get("n"), request.args.get("last")
    # isascii: str.isdigit() also takes digits such as "²" that int() refuses.
    if n_text is not None and not (n_text.isascii() and n_text.isdigit() and len(n_text) <= 9):
        raise PaginationInvalid(f"n must be a non-negative integer, got {n_text[:20]!r}")
    n = min(int(n_text), MAX_TAGS_PAGE) if n_text is not None else None
    tags = await resolver.tags(client, route.name)
    if last:
        tags = [t for t in tags if t > last]
    headers = {}
    if n is not None:
        more, tags = len(tags) > n, tags[:n]
    if n is not None and more and tags:
        query = {"n": str(n), "last": tags[-1]}
        if request.args.get("ns"):
            query["ns"] = request.args["ns"]
        headers["Link"] = f'</v2/{route.path_name}/tags/list?{urlencode(query)}>; rel="next"'
    return _json({"name": route.path_name, "tags": tags}, headers=headers)


async def _referrers(resolver: Resolver, client: UpstreamSeam, route: Route) -> Response:
    artifact_type = request.args.get("artifactType")
    body = await resolver.referrers(client, route.name, route.digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(body, 200, headers)
