"""The node's client of the tracker's control API (metainfo, bad reports, leases,
manifest bodies).

Speaks msgpack over httpx and raises the tracker's own exceptions
(p2preg.core.errors): a refused request comes back as the class the tracker raised,
and a tracker that cannot be reached or fails on its side as
`TrackerUnavailable`, so the node can fall back to upstream on that one class.
Given several trackers (replicas of one cluster), a request that cannot reach
the current one, or gets a 5xx from it, goes to the next, once round the list
at most; the one that answered stays current, so a healthy first tracker takes
all the traffic. A 4xx is an answer and goes back to the caller as is.
With a tls_dir (`ReloadingTLS`) it speaks HTTPS showing the node's certificate,
checks the tracker's (chain to ca.crt, hostname, and a `tracker` identity of the
node's own cluster), sends no token, and moves to a fresh connection pool when
renewed files were loaded. It also carries the batches of the node's announce
relay (`announce_batch`), so the node's announces share this connection. This
module must not retry beyond that one round or decide policy — the node does —
and keeps no state but its connection pool, which tracker is current, and the
seed confirmations waiting to ride the next lease request (confirm_rides.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlsplit

import httpx
import msgpack

from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from p2preg.core.pki import CertificateError
from p2preg.core.tls import ReloadingTLS, peer_identity
from tracker.announce import SwarmStats, decode_scrape
from tracker.client_failures import OneChunk, decoded, named, reply_error, why
from tracker.confirm_rides import ConfirmRides, Ride, riding

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
RELAY_CONTENT_TYPE = "application/msgpack"
# An idle pooled connection (mutual TLS) is kept this long before it is closed.
KEEPALIVE_EXPIRY_S = 60.0
# ... and without a certificate this long: the tracker closes one idle for 5 s
# (http_listener.KEEP_ALIVE_TIMEOUT_S), and httpx's default of 5 s let a request
# go out on a connection the moment the tracker closed it ("Server disconnected
# without sending a response"). Under the tracker's, this side closes first.
PLAIN_KEEPALIVE_EXPIRY_S = 2.0


class TrackerClient:
    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        node: str,
        token: str | None = None,
        tls: ReloadingTLS | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        http: httpx.AsyncClient | None = None,
        on_failover: Callable[[str], None] | None = None,
    ) -> None:
        if tls is not None and (token is not None or http is not None):
            raise ValueError("a TLS tracker client takes no token and builds its own pool")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("a tracker client needs at least one tracker URL")
        self.base_urls = tuple(u.rstrip("/") for u in urls)
        # Index of the tracker requests go to first; moved only when it fails.
        self._current = 0
        # Called with the reason ("unreachable" or "server_error") on each move.
        self._on_failover = on_failover
        self.node = node
        # Where this node's peer listens (0: unknown), named in the calls that then
        # stand for its announces (p2preg/node/localanswers.py).
        self.peer_port = 0
        self._rides = ConfirmRides(self._confirm_alone)
        self._token = token
        self._tls = tls
        self._timeout_s = timeout_s
        headers = {"Accept": wire.CONTENT_TYPE}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._own_http = http is None
        # One pool for every tracker: httpx keeps connections per host.
        self._http = http or self._new_pool()
        # The pool a renewal replaced: requests may still be running on it.
        self._retired: httpx.AsyncClient | None = None
        self._generation = 0 if tls is None else tls.generation
        self._headers = headers

    @property
    def base_url(self) -> str:
        """The tracker requests go to first now."""
        return self.base_urls[self._current]

    def _new_pool(self) -> httpx.AsyncClient:
        if self._tls is None:
            return httpx.AsyncClient(limits=httpx.Limits(keepalive_expiry=PLAIN_KEEPALIVE_EXPIRY_S))
        # The context verifies the tracker against ca.crt only, and its hostname
        # (the tracker's certificate must name the host in --tracker, which
        # libtorrent's HTTPS announces check too).
        # Idle connections are kept a minute (httpx's default is 5 s): the relay's
        # batches are seconds apart, and the tracker keeps a verified connection
        # open KEEP_ALIVE_VERIFIED_S (90 s), longer, so it is this side that closes.
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        return httpx.AsyncClient(
            verify=self._tls.client_context(), trust_env=False, follow_redirects=False,
            limits=limits,
        )

    async def _pool(self) -> httpx.AsyncClient:
        """The connection pool, a fresh one once renewed certificate files were loaded."""
        tls = self._tls
        if tls is not None:
            tls.client_context()  # notices renewed files
            if tls.generation != self._generation:
                self._generation = tls.generation
                if self._retired is not None:
                    await self._retired.aclose()
                self._retired, self._http = self._http, self._new_pool()
        return self._http

    def _check_server(self, base: str, response: httpx.Response) -> None:
        """Over TLS, only this cluster's tracker may answer (not another member's certificate)."""
        if self._tls is None or response.url.scheme != "https":
            return
        stream = response.extensions.get("network_stream")
        ssl_object = None if stream is None else stream.get_extra_info("ssl_object")
        if ssl_object is None:
            raise errors.TrackerUnavailable(f"tracker {base}: no TLS session to check")
        try:
            who = peer_identity(ssl_object)
        except CertificateError as e:
            raise errors.TrackerUnavailable(f"tracker {base}: {e}") from None
        mine = self._tls.identity.cluster
        if who.role != "tracker" or who.cluster != mine:
            raise errors.TrackerUnavailable(
                f"tracker {base} presented {who}, not a tracker of cluster {mine}"
            )

    async def aclose(self) -> None:
        if self._retired is not None:
            await self._retired.aclose()
        if self._own_http:
            await self._http.aclose()

    # -- URLs for libtorrent -----------------------------------------------------

    @property
    def announce_url(self) -> str:
        """The first tracker's announce URL, for a BitTorrent client announcing to it
        directly (a node's libtorrent announces through its relay instead); the path
        ends in /announce, as libtorrent's SSRF check wants."""
        return self.base_urls[0] + "/announce" + self._announce_query()

    @property
    def udp_announce_url(self) -> str:
        """BEP 15 URL on the first tracker's port; the token rides in BEP 41 URL data."""
        netloc = urlsplit(self.base_urls[0]).netloc
        return f"udp://{netloc}/announce" + self._announce_query()

    def _announce_query(self) -> str:
        """`token=` and, without TLS, `node=`: the tracker keeps one peer per node in
        a swarm (under mutual TLS the certificate names the node)."""
        params = [] if self._token is None else ["token=" + quote(self._token, safe="")]
        if self._tls is None:
            params.append("node=" + quote(self.node, safe=""))
        return "?" + "&".join(params) if params else ""

    async def announce_batch(self, queries: Sequence[bytes], timeout_s: float) -> list[bytes]:
        """Send announces a node's relay collected (raw query strings, as libtorrent
        built them) on this client's connection; their bencoded answers, in order.
        The tracker applies each under this connection's identity and address; in a
        token cluster the query also carries the token and the node's name, here in
        a request body, never in a URL. Fails over like every other request."""
        extra = self._announce_query()[1:].encode()
        rows = [q + b"&" + extra if extra else q for q in queries]
        headers = dict(self._headers)
        headers["Content-Type"] = RELAY_CONTENT_TYPE
        body = msgpack.packb(rows, use_bin_type=True)
        response = await self._send("POST", "/v1/announces", body, headers, timeout_s)
        try:
            answers = msgpack.unpackb(response.content, raw=False)
        except (ValueError, msgpack.UnpackException):
            answers = None
        if not (isinstance(answers, list) and len(answers) == len(rows)
                and all(isinstance(a, bytes) for a in answers)):  # fmt: skip
            raise errors.TrackerUnavailable(f"tracker sent {len(rows)} announces a bad answer")
        return answers

    # -- metainfo ------------------------------------------------------------------

    async def publish_metainfo(
        self, digest: Digest, size: int, metainfo: bytes
    ) -> wire.MetainfoRecord:
        """File the metainfo made from the verified blob; idempotent for the same bytes."""
        msg = wire.PublishMetainfo(self.node, size, metainfo, self.peer_port)
        return await self._call("PUT", f"/v1/metainfo/{digest}", msg, wire.MetainfoRecord)

    async def lookup_metainfo(self, digest: Digest) -> wire.MetainfoRecord | None:
        try:
            return await self._call("GET", f"/v1/metainfo/{digest}", None, wire.MetainfoRecord)
        except errors.NotFound:
            return None

    async def report_bad(
        self, digest: Digest, bad_info_hash: bytes, size: int, replacement: bytes, reason: str
    ) -> wire.MetainfoRecord:
        """Replace a poisoned metainfo with `replacement`, made from the verified blob."""
        msg = wire.ReportBad(self.node, bad_info_hash, reason, size, replacement)
        return await self._call("POST", f"/v1/metainfo/{digest}/bad", msg, wire.MetainfoRecord)

    async def confirm_seed(self, digest: Digest, info_hash: bytes) -> None:
        """Tell the tracker we downloaded torrent `info_hash` and verified its bytes: with
        the next lease request if one goes soon, else alone (confirm_rides.py)."""
        await self._rides.confirm(digest, info_hash)

    async def _confirm_alone(
        self, digest: Digest, info_hash: bytes, riders: list[Ride]
    ) -> list[str] | None:
        """The confirmation in a call of its own, `riders` with it: those the tracker
        took (None: it named none, as an older tracker's empty answer)."""
        msg = wire.ConfirmSeed(self.node, info_hash, self.peer_port, *riding(riders))
        answer = await self._request("POST", f"/v1/metainfo/{digest}/confirm", msg)
        return decoded(wire.SeedsConfirmed, answer).confirmed if answer else None

    async def report_stall(self, digest: Digest, peer: bytes) -> None:
        """Report the peer at `peer` (compact address): unchoked, asked, no block."""
        msg = wire.ReportStall(self.node, peer)
        await self._request("POST", f"/v1/swarms/{digest}/stalled", msg)

    # -- chunk torrents ------------------------------------------------------------

    async def publish_chunk(self, blob: Digest, msg: wire.PublishChunk) -> None:
        """File the torrent of one chunk of `blob`, as the holder of its lease."""
        await self._request("PUT", f"/v1/chunks/{blob}", msg)

    async def list_chunks(
        self, blob: Digest, *, have: int = 0, wait_s: int = 0
    ) -> wire.ChunkList | None:
        """The chunk torrents filed for `blob` so far, or None if there are none; with
        `wait_s`, once there are more than `have` of them or the list closed (a long
        poll: the tracker holds it up to `wait_s`, then answers what there is). With
        a `peer_port`, the list also names the peers of the blob's chunk swarms."""
        path = f"/v1/chunks/{blob}?have={have}&wait={wait_s}"
        if self.peer_port:
            path += f"&port={self.peer_port}&node={quote(self.node, safe='')}"
        try:
            return await self._call("GET", path, None, wire.ChunkList, extra_timeout_s=wait_s)
        except errors.NotFound:
            return None

    async def report_chunks(self, blob: Digest, publisher: str, reason: str) -> None:
        """The chunks of `blob` that `publisher` filed were assembled and do not hash to it."""
        msg = wire.ReportChunks(self.node, publisher, reason)
        await self._request("POST", f"/v1/chunks/{blob}/bad", msg)

    # -- manifest bodies -----------------------------------------------------------

    async def put_manifest(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None:
        """Hand the cluster a manifest body fetched from `ns`'s `repository` and verified."""
        msg = wire.PutManifest(self.node, ns, repository, media_type, body)
        await self._request("PUT", f"/v1/manifests/{digest}", msg)

    async def get_manifest(self, digest: Digest) -> wire.ManifestBody | None:
        """The body the cluster holds for `digest` (check it against the digest), or None."""
        try:
            return await self._call("GET", f"/v1/manifests/{digest}", None, wire.ManifestBody)
        except errors.NotFound:
            return None

    # -- leases --------------------------------------------------------------------

    async def acquire_lease(
        self,
        digest: Digest,
        *,
        size: int | None = None,
        wait_s: float = 0.0,
        group: str | None = None,
        order: int = 0,
        manifest: bool = False,
    ) -> wire.LeaseReply:
        """GRANTED (fetch upstream), SEEDED (join the swarm) or WAIT (ask again later).

        With `wait_s` the tracker holds the request until something changes or
        `wait_s` (capped by the tracker) has passed. `group` (the image's
        manifest digest) and `order` (the blob's place in it) let the tracker
        send an image's blobs over the upstream link earliest first. `manifest`:
        the digest is a manifest's, SEEDED (no metainfo) once it is on the shelf.
        """
        rides, confirmed = self._rides.board(), None
        msg = wire.LeaseRequest(self.node, size, wait_s, group, order, manifest, self.peer_port,
                                *riding(rides))  # fmt: skip
        try:
            reply = await self._call(
                "POST", f"/v1/leases/{digest}", msg, wire.LeaseReply, extra_timeout_s=wait_s
            )
            confirmed = reply.confirmed
            self._rides.replied(confirmed)
        finally:
            self._rides.land(rides, confirmed)
        return reply

    async def renew_lease(
        self,
        digest: Digest,
        lease_id: str,
        bytes_done: int,
        size: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> wire.LeaseReply:
        """Keep the lease; raises LeaseLost once it has expired, been released or passed on.

        `timeout_s`: how long each tracker gets before the next is tried (the
        client's own timeout if None): a renewal is due again soon, and a hung
        replica must cost one renewal, not the lease.
        """
        msg = wire.LeaseRenew(lease_id, bytes_done, size, self.node)
        return await self._call(
            "PUT", f"/v1/leases/{digest}", msg, wire.LeaseReply, timeout_s=timeout_s
        )

    async def release_lease(self, digest: Digest, lease_id: str) -> None:
        msg = wire.LeaseRelease(lease_id, self.node)
        await self._request("POST", f"/v1/leases/{digest}/release", msg)

    # -- tag answers -----------------------------------------------------------------

    async def report_tag(
        self, ns: str, repository: str, tag: str, digest: Digest, accept: str = ""
    ) -> None:
        """Tell the cluster what seed registry `ns` just said of a tag (tracker/tags.py)."""
        msg = wire.TagSeen(self.node, ns, repository, tag, str(digest), accept)
        await self._request("PUT", "/v1/tags", msg)

    async def query_tag(
        self, ns: str, repository: str, tag: str, accept: str = ""
    ) -> wire.TagAnswer:
        """The last answer any node reported for the tag (`digest` None: none)."""
        msg = wire.TagQuery(self.node, ns, repository, tag, accept)
        return await self._call("POST", "/v1/tags/query", msg, wire.TagAnswer)

    # -- what operators' tools read ------------------------------------------------

    async def scrape(self, info_hashes: Sequence[bytes]) -> dict[bytes, SwarmStats]:
        """BEP 48 scrape of these info-hashes (unregistered ones are left out)."""
        query = "&".join("info_hash=" + quote_from_bytes(ih, safe="") for ih in info_hashes)
        token = "" if self._token is None else "&token=" + quote(self._token, safe="")
        response = await self._get(f"/scrape?{query}{token}")
        try:
            return decode_scrape(response.content)
        except errors.InvalidRequest as e:
            raise errors.TrackerError(f"tracker refused the scrape: {e}") from None

    async def status(self, limit: int = 50) -> dict[str, Any]:
        """`GET /v1/status`: totals and the busiest swarms, as the tracker's JSON."""
        response = await self._get(f"/v1/status?limit={limit}", accept="application/json")
        doc = response.json()
        if not isinstance(doc, dict):
            raise errors.TrackerUnavailable("tracker sent a bad status")
        return doc

    # -- plumbing ------------------------------------------------------------------

    async def _get(self, path: str, *, accept: str | None = None) -> httpx.Response:
        headers = dict(self._headers)
        if accept is not None:
            headers["Accept"] = accept
        return await self._send("GET", path, None, headers, self._timeout_s)

    async def _call(
        self,
        method: str,
        path: str,
        message: wire.Message | None,
        reply: type[wire.M],
        *,
        extra_timeout_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> wire.M:
        content = await self._request(method, path, message, extra_timeout_s, timeout_s)
        return decoded(reply, content)

    async def _request(
        self,
        method: str,
        path: str,
        message: wire.Message | None,
        extra_timeout_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> bytes:
        """`message` sent, and the answer's body (empty where there is none)."""
        headers = dict(self._headers)
        content = None
        if message is not None:
            content = wire.encode(message)
            headers["Content-Type"] = wire.CONTENT_TYPE
        each_s = (self._timeout_s if timeout_s is None else timeout_s) + extra_timeout_s
        return (await self._send(method, path, content, headers, each_s)).content

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str],
        timeout_s: float,
    ) -> httpx.Response:
        """One request, to the current tracker and, if it cannot answer, the next ones.

        Each tracker is tried once at most, starting from the current one; a
        connection failure (refused, reset, timed out, a TLS failure or the wrong
        server certificate) or a 5xx moves to the next. A 4xx is raised at once.
        """
        http = await self._pool()
        start = self._current
        failure: errors.TrackerError | None = None
        said: list[str] = []
        standing_by = False
        for step in range(len(self.base_urls)):
            index = (start + step) % len(self.base_urls)
            base = self.base_urls[index]
            try:
                request = http.build_request(
                    method, base + path, content=content, headers=headers, timeout=timeout_s
                )
                request.stream = OneChunk(content or b"")
                response = await http.send(request)
                self._check_server(base, response)
            except httpx.HTTPError as e:
                failure = errors.TrackerUnavailable(
                    f"tracker {base}: {why(e, tls=self._tls is not None)}"
                )
                reason = "unreachable"
            except errors.TrackerUnavailable as e:
                failure, reason = e, "unreachable"
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise reply_error(response)
                    return response
                failure, reason = reply_error(response), "server_error"
            said.append(named(base, failure))
            standing_by = standing_by or isinstance(failure, errors.StandingBy)
            if step + 1 < len(self.base_urls):  # the last one tried stays current
                self._failed(index, reason, failure)
        assert failure is not None
        # A replica standing by for another: the one serving may be taking over.
        kind = errors.StandingBy if standing_by else type(failure)
        if len(said) > 1:  # every one of them failed: say how
            raise kind("; ".join(said))
        raise failure

    def _failed(self, index: int, reason: str, failure: errors.TrackerError) -> None:
        """Tracker `index` could not answer: the next becomes current, unless a
        concurrent request already moved on (one move per failure seen)."""
        if len(self.base_urls) == 1 or self._current != index:
            return
        self._current = (index + 1) % len(self.base_urls)
        failed = named(self.base_urls[index], failure)
        log.warning("%s: moving on to tracker %s", failed, self.base_url)
        if self._on_failover is not None:
            self._on_failover(reason)


@asynccontextmanager
async def open_tracker_client(
    base_url: str | Sequence[str],
    *,
    node: str,
    token: str | None = None,
    tls: ReloadingTLS | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_failover: Callable[[str], None] | None = None,
) -> AsyncIterator[TrackerClient]:
    """A client of the tracker at `base_url`, or of several, tried in that order."""
    client = TrackerClient(
        base_url, node=node, token=token, tls=tls, timeout_s=timeout_s, on_failover=on_failover
    )
    try:
        yield client
    finally:
        await client.aclose()
