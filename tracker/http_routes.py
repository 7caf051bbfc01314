"""Every HTTP route of the tracker's port, as one table, and their answers.

Owns what each request gets: BitTorrent announces and scrapes (bencoded, HTTP
200 even for failures, and the connection closes, as BitTorrent clients
expect), the control API (msgpack bodies, bearer token), `/healthz`,
`/metrics` and `/v1/status`; under mutual TLS, the rule that a control message
names the node of its client certificate and no other (403 otherwise); who
a request is counted against (`Call.who`) for its quota and long poll
(tracker/quotas.py decides); and the one place where an error becomes a control
API answer: a msgpack `ErrorReply` with the error's 4xx status (500 only for
our own faults, logged). `TrackerHttp` is what the listener serves: `handle`
for a parsed request, `refuse` for one that could not be read, `fast_answer`
for the listener's fast path. This module must not parse HTTP framing
(http_protocol does) or touch sockets (http_listener does), and holds no tracker
logic (the coordinator does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from p2preg.core import errors, wire
from tracker import bittorrent, fronts
from tracker.admission import announce_identity
from tracker.announce import ANNOUNCE_PATH, SCRAPE_PATH, encode_failure, split_target
from tracker.chunk_torrents import ChunkPeer
from tracker.coordinator import Tracker
from tracker.http_protocol import BodyLimit, Refusal, Request, Response, encode_closing
from tracker.manifest_shelf import MAX_MANIFEST_BYTES
from tracker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tracker.quotas import Kind
from tracker.status import tracker_status

log = logging.getLogger("p2preg.tracker")
# The largest body is a metainfo (or manifest) upload plus a little framing.
BODY_FRAMING_BYTES = 64 * 1024
# `GET /v1/status?limit=`: how many swarms it lists by default and at most.
STATUS_DEFAULT_LIMIT = 50
STATUS_MAX_LIMIT = 1000
# Codes of refusals that are about HTTP, not about the tracker's errors.
_HTTP_CODES = {
    403: errors.Forbidden.code,
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


@dataclass(frozen=True, slots=True)
class Call:
    """One routed request: the tracker, the request, and the `{digest}` of its path."""

    tracker: Tracker
    request: Request
    digest: str = ""

    def message(self, cls: type[wire.M], quota: Kind | None = None) -> wire.M:
        """The body as `cls`; a `node` it names must be the client certificate's.
        With `quota`, the request is charged to its identity (RateLimited past it)."""
        msg = wire.decode(cls, self.request.body)
        named = getattr(msg, "node", None)
        identity = self.request.identity
        if identity is not None and named is not None and named != identity.name:
            raise errors.Forbidden(
                f"the message names node {named[:128]!r}; this connection is {identity.name!r}"
            )
        if quota is not None:
            self.tracker.quotas.take(quota, self.who(msg), len(self.request.body))
        return msg

    def identity(self, named: str | None) -> str | None:
        """Who is asking: the certificate's node under TLS, else the node the message
        names (`named`; None when it names none, an older node's renewal)."""
        identity = self.request.identity
        return named if identity is None else identity.name

    def who(self, msg: object) -> str:
        """The identity a request is counted against (quotas): `identity`, or the
        client's address for a message that names no node."""
        named = getattr(msg, "node", None)
        return self.identity(named if isinstance(named, str) else None) or (
            f"ip:{self.request.client_ip}"
        )


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: bytes
    # Segments; "{digest}" matches any one segment.
    path: tuple[str, ...]
    handler: Handler
    # Needs the bearer token (BitTorrent routes carry theirs in the query).
    bearer: bool = True


def _msgpack(message: wire.Message, status: int = 200) -> Response:
    return Response(status, wire.encode(message), wire.CONTENT_TYPE)


def _error(code: str, message: str, status: int) -> Response:
    return _msgpack(wire.ErrorReply(code, message), status)


# -- handlers ----------------------------------------------------------------------


async def _healthz(call: Call) -> Response:
    return Response(200, b"ok\n", "text/plain; charset=utf-8")


async def _readyz(call: Call) -> Response:
    """Ready while serving: a replica standing by is alive but must get no traffic."""
    return Response(200, b"ok\n", "text/plain; charset=utf-8")


async def _metrics(call: Call) -> Response:
    return Response(200, call.tracker.metrics.render(), METRICS_CONTENT_TYPE)


async def _bittorrent(call: Call) -> Response:
    req = call.request
    # The route matched the decoded path; the BitTorrent codec reads the raw query.
    path = ANNOUNCE_PATH if req.path == ANNOUNCE_PATH.decode() else SCRAPE_PATH
    body = bittorrent.http_body(call.tracker, path, req.query, req.client_ip, call.identity(None))
    return Response(200, body or b"", "text/plain", close=True)


async def _status(call: Call) -> Response:
    query = call.request.query.decode("latin-1")
    text = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "limit"), None)
    text = str(STATUS_DEFAULT_LIMIT) if text is None else text
    if not (text.isascii() and text.isdigit()) or len(text) > 6:  # int() refuses "²"
        raise errors.InvalidRequest(f"limit must be a number, got {text[:20]!r}")
    doc = dataclasses.asdict(tracker_status(call.tracker, min(int(text), STATUS_MAX_LIMIT)))
    return Response(200, json.dumps(doc).encode(), "application/json")


async def _lookup(call: Call) -> Response:
    return _msgpack(call.tracker.lookup(call.digest))


async def _publish(call: Call) -> Response:
    msg = call.message(wire.PublishMetainfo, Kind.PUBLISH)
    record, created = await call.tracker.publish(call.digest, msg, call.request.client_ip)
    return _msgpack(record, 201 if created else 200)


async def _report_bad(call: Call) -> Response:
    msg = call.message(wire.ReportBad, Kind.REPORT)
    return _msgpack(await call.tracker.report_bad(call.digest, msg))


async def _confirm(call: Call) -> Response:
    msg = call.message(wire.ConfirmSeed, Kind.PUBLISH)
    client_ip = call.request.client_ip
    await call.tracker.confirm_seed(call.digest, msg, client_ip)
    # Taken: then its riders, each as a call alone would be, named in the answer.
    confirmed = await call.tracker.confirm_riding(msg, call.who(msg), client_ip)
    return _msgpack(wire.SeedsConfirmed(confirmed))


async def _stalled(call: Call) -> Response:
    call.tracker.report_stall(call.digest, call.message(wire.ReportStall, Kind.REPORT))
    return Response(204, b"", wire.CONTENT_TYPE)


async def _put_manifest(call: Call) -> Response:
    msg = call.message(wire.PutManifest, Kind.PUBLISH)
    created = await call.tracker.put_manifest(call.digest, msg)
    return Response(201 if created else 200, b"", wire.CONTENT_TYPE)


async def _get_manifest(call: Call) -> Response:
    return _msgpack(call.tracker.get_manifest(call.digest))


async def _acquire(call: Call) -> Response:
    msg = call.message(wire.LeaseRequest, Kind.LEASE)
    identity = call.identity(msg.node)
    # Named in every reply, none or some: the node learns that riders are taken here.
    confirmed = await call.tracker.confirm_riding(msg, call.who(msg), call.request.client_ip)
    # Past a long-poll cap the request is answered at once instead of held.
    with call.tracker.quotas.long_polls.hold(call.who(msg), msg.wait_s) as wait_s:
        msg = dataclasses.replace(msg, wait_s=wait_s)
        reply = await call.tracker.acquire_lease(
            call.digest, msg, identity=identity, client_ip=call.request.client_ip
        )
        return _msgpack(dataclasses.replace(reply, confirmed=confirmed))


async def _renew(call: Call) -> Response:
    msg = call.message(wire.LeaseRenew, Kind.LEASE)
    reply = await call.tracker.renew_lease(call.digest, msg, identity=call.identity(msg.node))
    return _msgpack(reply)


async def _release(call: Call) -> Response:
    msg = call.message(wire.LeaseRelease, Kind.LEASE)
    await call.tracker.release_lease(call.digest, msg, identity=call.identity(msg.node))
    return Response(204, b"", wire.CONTENT_TYPE)


async def _tag_seen(call: Call) -> Response:
    msg = call.message(wire.TagSeen, Kind.PUBLISH)
    await call.tracker.tag_seen(msg, identity=call.identity(msg.node) or msg.node)
    return Response(204, b"", wire.CONTENT_TYPE)


async def _tag_query(call: Call) -> Response:
    return _msgpack(call.tracker.tag_query(call.message(wire.TagQuery, Kind.LEASE)))


async def _forwarded(call: Call) -> Response:
    """Announces a standby replica forwards (tracker/fronts.py): only a replica may
    speak for a node, so under mutual TLS the connection must be a tracker's."""
    identity = call.request.identity
    try:
        if identity is not None and identity.role != "tracker":
            raise errors.Forbidden(f"{identity} is not a tracker: it cannot forward announces")
        items = fronts.decode_batch(call.request.body)
    except errors.TrackerError:
        call.tracker.metrics.forwarded_refused.inc()
        raise
    bodies = fronts.answer_batch(call.tracker, items)
    return Response(200, fronts.encode_answers(bodies), fronts.CONTENT_TYPE)


def _relayed_items(call: Call) -> list[fronts.Forwarded]:
    """A node relay's batch as announces of this connection's identity and address."""
    try:
        queries = fronts.decode_relayed(call.request.body)
    except errors.TrackerError:
        call.tracker.metrics.relayed.labels("refused").inc()
        raise
    return fronts.relayed(queries, call.request.client_ip, call.identity(None))


async def _relayed(call: Call) -> Response:
    """Announces a node's relay sends on its control connection (p2preg/node/relay.py):
    each answered as if it had come straight from the node, no handshake of its own."""
    bodies = fronts.answer_relayed(call.tracker, _relayed_items(call))
    return Response(200, fronts.encode_answers(bodies), fronts.CONTENT_TYPE)


async def _publish_chunk(call: Call) -> Response:
    msg = call.message(wire.PublishChunk, Kind.PUBLISH)
    holder = _chunk_peer(call, call.identity(msg.node), msg.port)
    created = await call.tracker.chunks.publish(call.digest, msg, holder)
    return Response(201 if created else 200, b"", wire.CONTENT_TYPE)


async def _list_chunks(call: Call) -> Response:
    """`?have=N&wait=S`: held up to S seconds (at most `lease_wait_max_s`) until the list
    has more than N chunks or closes; past a long-poll cap, answered at once.
    `&port=P` (and, without mutual TLS, `&node=NAME`): the reader's peer, entered in
    the blob's chunk swarms."""
    query = dict(parse_qsl(call.request.query.decode("latin-1"), keep_blank_values=True))
    have, wait_s = _count(query.get("have", "0"), "have"), _count(query.get("wait", "0"), "wait")
    wait_s = min(wait_s, int(call.tracker.config.lease_wait_max_s))
    node = query.get("node") or None
    if node is not None and not 0 < len(node) <= wire.STR_LIMITS["node"]:
        raise errors.InvalidRequest(f"node must be 1 to {wire.STR_LIMITS['node']} characters")
    reader = _chunk_peer(call, call.identity(node), _count(query.get("port", "0"), "port"))
    with call.tracker.quotas.long_polls.hold(call.who(None), wait_s) as held_s:
        return _msgpack(await call.tracker.chunks.poll(call.digest, have, held_s, reader))


def _chunk_peer(call: Call, identity: str | None, port: int) -> ChunkPeer | None:
    """The sender's peer for the blob's chunk swarms, as an announce would enter it
    (port 0: an older node, which announces its chunk torrents instead)."""
    if not port:
        return None
    ip = call.request.client_ip
    return ChunkPeer(announce_identity(identity, None, ip), ip, port)


def _count(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise errors.InvalidRequest(f"{name} must be a whole number, got {text[:20]!r}")
    return int(text)


async def _report_chunks(call: Call) -> Response:
    await call.tracker.chunks.report(call.digest, call.message(wire.ReportChunks, Kind.REPORT))
    return Response(204, b"", wire.CONTENT_TYPE)


def _route(method: str, path: str, handler: Handler, *, bearer: bool = True) -> Route:
    return Route(method.encode(), tuple(path.strip("/").split("/")), handler, bearer)


ROUTES: tuple[Route, ...] = (
    _route("GET", "/healthz", _healthz, bearer=False),
    _route("GET", "/metrics", _metrics, bearer=False),
    _route("GET", "/readyz", _readyz, bearer=False),
    _route("GET", "/announce", _bittorrent, bearer=False),
    _route("GET", "/scrape", _bittorrent, bearer=False),
    _route("GET", "/v1/status", _status),
    _route("GET", "/v1/metainfo/{digest}", _lookup),
    _route("PUT", "/v1/metainfo/{digest}", _publish),
    _route("POST", "/v1/metainfo/{digest}/bad", _report_bad),
    _route("POST", "/v1/metainfo/{digest}/confirm", _confirm),
    _route("POST", "/v1/swarms/{digest}/stalled", _stalled),
    _route("POST", "/v1/leases/{digest}", _acquire),
    _route("PUT", "/v1/leases/{digest}", _renew),
    _route("POST", "/v1/leases/{digest}/release", _release),
    _route("PUT", "/v1/tags", _tag_seen),
    _route("POST", "/v1/tags/query", _tag_query),
    _route("GET", "/v1/manifests/{digest}", _get_manifest),
    _route("PUT", "/v1/manifests/{digest}", _put_manifest),
    _route("POST", fronts.FORWARD_PATH, _forwarded),
    _route("GET", "/v1/chunks/{digest}", _list_chunks),
    _route("PUT", "/v1/chunks/{digest}", _publish_chunk),
    _route("POST", "/v1/chunks/{digest}/bad", _report_chunks),
    _route("POST", fronts.RELAY_PATH, _relayed),
)
# What the plain metrics listener serves beside an mTLS port: nothing that
# carries a secret or changes state.
METRICS_ROUTES: tuple[Route, ...] = ROUTES[:3]
# What a replica standing by still answers (replica.py): the rest gets a 503.
_STANDBY_HANDLERS = (_healthz, _metrics)
# What a tracker's certificate may ask of another replica: the rest is a node's.
_REPLICA_HANDLERS = (_healthz, _metrics, _readyz, _forwarded)


@dataclass(frozen=True, slots=True)
class Standby:
    """Why a replica answers nothing but health and metrics, as the 503 it gives."""

    code: str
    message: str


# Another replica holds the term: one serves within about a term (nodes wait).
OTHER_SERVES = Standby(
    errors.StandingBy.code, "this tracker replica stands by: another one serves the cluster"
)
# The store does not answer: nobody serves until it does (nodes go upstream).
STORE_AWAY = Standby(
    errors.TrackerUnavailable.code, "this tracker replica stands by: it cannot reach the store"
)


def match(path: str, routes: tuple[Route, ...] = ROUTES) -> list[tuple[Route, str]]:
    """The routes whose path matches (any method), each with its `{digest}` segment."""
    if not path.startswith("/"):
        return []  # an absolute-form or asterisk target names no route of ours
    segments = path.strip("/").split("/")
    found = []
    for route in routes:
        if len(route.path) != len(segments):
            continue
        digest = ""
        for want, got in zip(route.path, segments, strict=True):
            if want == "{digest}" and got:
                digest = got
            elif want != got:
                break
        else:
            found.append((route, digest))
    return found


def _bearer(request: Request) -> bytes | None:
    header = (request.header(b"authorization") or b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token else None


class TrackerHttp:
    """The tracker's HTTP side: what http_listener serves on every connection."""

    def __init__(self, tracker: Tracker, routes: tuple[Route, ...] = ROUTES) -> None:
        self.tracker = tracker
        self.routes = routes
        self._bittorrent = any(r.handler is _bittorrent for r in routes)
        # A manifest body may be larger than a metainfo; only its route takes one.
        self.max_body_bytes = BodyLimit(
            tracker.config.max_metainfo_bytes + BODY_FRAMING_BYTES,
            ((b"/v1/manifests/", MAX_MANIFEST_BYTES + BODY_FRAMING_BYTES),),
        )
        # Why this replica answers nothing but health and metrics now; None: it serves.
        self.standby: Standby | None = None
        # Standing by for another replica, the sender of BitTorrent requests to it.
        self.front: fronts.Front | None = None
        # `match` of each path without a `{digest}`, worked out once: a look-up for
        # the paths asked most (relayed announces) instead of a walk of the table.
        self._matched = {
            p: match(p, routes) for p in ("/" + "/".join(r.path) for r in routes)
            if "{digest}" not in p
        }  # fmt: skip

    def serve(self, tracker: Tracker) -> None:
        """Answer from `tracker` (a replica's new term) from now on."""
        self.tracker = tracker
        self.standby = None

    def fast_answer(self, target: bytes, ip: str) -> bytes | None:
        """The whole response to a GET of `target` if it is a BitTorrent one, else None."""
        if not self._bittorrent or self.standby is not None:
            return None
        path, query = split_target(target)
        body = bittorrent.http_body(self.tracker, path, query, ip)
        return None if body is None else encode_closing(body)

    async def handle(self, request: Request) -> Response:
        # HEAD is GET without the body (the framing leaves it out).
        method = b"GET" if request.method == b"HEAD" else request.method
        path = request.path
        found = self._matched.get(path) or match(path, self.routes)
        if not found:
            return _error("not_found", f"no route {request.path[:200]!r}", 404)
        chosen = next(((r, d) for r, d in found if r.method == method), None)
        if chosen is None:
            allowed = ", ".join(sorted({r.method.decode() for r, _ in found}))
            refused = _error("method_not_allowed", f"use {allowed}", 405)
            return dataclasses.replace(refused, headers=(("Allow", allowed),))
        route, digest = chosen
        identity = request.identity
        if identity is not None and identity.role != "node" and (
            route.handler not in _REPLICA_HANDLERS
        ):
            self.tracker.metrics.tls_refused("wrong_role")
            return _error(errors.Forbidden.code, f"{identity} is not a node certificate", 403)
        standby = self.standby
        if standby is not None and route.handler not in _STANDBY_HANDLERS:
            if route.handler is _bittorrent:  # what a BitTorrent client reads: bencoded
                return await self._front(request, standby)
            if route.handler is _relayed and self.front is not None and standby is OTHER_SERVES:
                return await self._front_relayed(Call(self.tracker, request, digest), standby)
            return _error(standby.code, standby.message, 503)
        try:
            if route.bearer:
                self.tracker.check_token(_bearer(request))
            return await route.handler(Call(self.tracker, request, digest))
        except errors.TrackerError as e:
            return _error(e.code, str(e), e.status)
        except wire.WireError as e:
            return _error(errors.InvalidRequest.code, str(e), 400)
        except Exception:
            log.exception("%s %s failed", method.decode(), request.path[:200])
            return _error("internal_error", "the tracker failed on its side; see its log", 500)

    async def _front(self, request: Request, standby: Standby) -> Response:
        """A standby's answer to an announce or scrape: the serving replica's, through
        the front, while another replica serves; else (or failing that) a failure."""
        front = self.front
        if front is not None and standby is OTHER_SERVES:
            identity = None if request.identity is None else request.identity.name
            path = ANNOUNCE_PATH if request.path == ANNOUNCE_PATH.decode() else SCRAPE_PATH
            item = fronts.Forwarded(path, request.query, request.client_ip, identity)
            body = await front.answer(item)
            if body is not None:
                return Response(200, body, "text/plain", close=True)
            message = "this tracker replica could not reach the one that serves; try again"
            return Response(503, encode_failure(message), "text/plain", close=True)
        return Response(503, encode_failure(standby.message), "text/plain", close=True)

    async def _front_relayed(self, call: Call, standby: Standby) -> Response:
        """A node relay's batch on a standby: the serving replica's answers through the
        front; else a 503, so that the node's client tries its next tracker."""
        assert self.front is not None
        try:
            self.tracker.check_token(_bearer(call.request))
            items = _relayed_items(call)
        except errors.TrackerError as e:
            return _error(e.code, str(e), e.status)
        bodies = await self.front.answer_all(items)
        if bodies is None:
            return _error(standby.code, "could not reach the serving replica", 503)
        self.tracker.metrics.relayed.labels("forwarded").inc(len(items))
        return Response(200, fronts.encode_answers(bodies), fronts.CONTENT_TYPE)

    def refuse(self, refusal: Refusal) -> Response:
        """The answer to a request that could not be read; the connection closes after it."""
        code = _HTTP_CODES.get(refusal.status, errors.InvalidRequest.code)
        return dataclasses.replace(_error(code, refusal.reason, refusal.status), close=True)
