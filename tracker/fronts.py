"""Announce fronts: a standby replica answers BitTorrent announces through the serving one.

With a Redis store one replica serves a term (replica.py); the others stand by.
A standby that gets an announce or scrape — it has already terminated the
node's TLS and knows its identity — forwards it (the identity, the client's
address, the raw query) to the replica that holds the term, over kept-alive
connections and in batches of whatever arrived meanwhile; that replica applies
each with the unchanged rules (bittorrent.http_body on its one `Tracker`) and
returns the bencoded bodies, which the standby sends to its nodes. So the
handshakes spread over every replica while the rules stay one implementation
in one memory. Only a replica may speak for a node: under mutual TLS the
forwarding connection shows a tracker certificate of the cluster (and checks
that the far side shows one too); with a token, it carries the cluster token.

Nodes batch too: a node's announce relay (p2preg/node/relay.py) sends
libtorrent's announces over its kept-alive control connection to
`RELAY_PATH`, and they are applied the same way, under that connection's
identity and address; a standby forwards such a batch like any announce.

Owns the batch codecs (sans-IO: `encode_batch`, `decode_batch`, `encode_answers`,
`decode_answers`, `decode_relayed`), the serving side's `answer_batch` and
`answer_relayed`, and `Front`, the
standby's sender: a failure — no serving replica known, unreachable, out of
time, refused — is answered at once with a bencoded failure after at most
`FORWARD_TIMEOUT_S`, so libtorrent moves on or retries. It must not decide
who serves (replica.py does) or route HTTP requests (http_routes does).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import msgpack
import trio

from p2preg.core import errors
from p2preg.core.pki import CertificateError
from p2preg.core.tls import ReloadingTLS, client_context, peer_identity
from tracker import bittorrent
from tracker.announce import ANNOUNCE_PATH, MAX_QUERY_BYTES, SCRAPE_PATH
from tracker.coordinator import Tracker
from tracker.metrics import TrackerMetrics

log = logging.getLogger("p2preg.tracker")

FORWARD_PATH = "/v1/replica/announces"
# Where a node's announce relay sends its batches, on its control connection.
RELAY_PATH = "/v1/announces"
CONTENT_TYPE = "application/msgpack"
# A node's announce waits at most this long on a front before it is answered
# with a failure: libtorrent then tries its next tier, or again later.
FORWARD_TIMEOUT_S = 2.0
# Announces per forwarded request, at most, and the bytes of their queries: a
# batch stays within the smallest body the serving replica takes
# (max_metainfo_bytes ≥ 4 KiB, plus 64 KiB). A libtorrent announce is ~250 B.
BATCH_MAX = 128
BATCH_QUERY_BYTES = 56 * 1024
# Batches in flight to the serving replica at once (a kept-alive connection
# each): few, so that what arrives while one is out goes in the next together.
SENDERS = 2
# Announces queued on a front, at most; past it they are answered `busy`.
QUEUE_MAX = 20_000
MAX_IDENTITY_CHARS = 253  # p2preg.core.pki's name limit
_PATHS = (ANNOUNCE_PATH, SCRAPE_PATH)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One announce or scrape as the node sent it to a front."""

    path: bytes
    query: bytes
    client_ip: str
    # The client certificate's node under mutual TLS, else None.
    identity: str | None


def encode_batch(items: Sequence[Forwarded]) -> bytes:
    rows = [[i.path, i.query, i.client_ip, i.identity] for i in items]
    return bytes(msgpack.packb(rows, use_bin_type=True))


def _unpack(body: bytes) -> object:
    try:
        return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise errors.InvalidRequest(f"not a forwarded batch: {type(e).__name__}") from None


def _checked(row: object) -> Forwarded:
    if not isinstance(row, list) or len(row) != 4:
        raise errors.InvalidRequest("a forwarded announce is [path, query, ip, identity]")
    path, query, ip, identity = row
    if path not in _PATHS:
        raise errors.InvalidRequest("a forwarded request is an announce or a scrape")
    if not isinstance(query, bytes) or len(query) > MAX_QUERY_BYTES:
        raise errors.InvalidRequest(f"a forwarded query is bytes of at most {MAX_QUERY_BYTES}")
    try:
        ipaddress.ip_address(ip if isinstance(ip, str) else "")
    except ValueError:
        raise errors.InvalidRequest("a forwarded client address is an IP address") from None
    if identity is not None and (
        not isinstance(identity, str) or not 0 < len(identity) <= MAX_IDENTITY_CHARS
    ):
        raise errors.InvalidRequest("a forwarded identity is a node name or nil")
    return Forwarded(path, query, ip, identity)


def decode_batch(body: bytes) -> list[Forwarded]:
    """The forwarded announces of a request body; InvalidRequest if malformed."""
    rows = _unpack(body)
    if not isinstance(rows, list) or not 1 <= len(rows) <= BATCH_MAX:
        raise errors.InvalidRequest(f"a forwarded batch is a list of 1 to {BATCH_MAX}")
    return [_checked(row) for row in rows]


def encode_answers(bodies: Sequence[bytes]) -> bytes:
    return bytes(msgpack.packb(list(bodies), use_bin_type=True))


def decode_answers(body: bytes, count: int) -> list[bytes]:
    """The bencoded answers of a forwarded batch of `count`; InvalidRequest if not that."""
    answers = _unpack(body)
    if (
        not isinstance(answers, list)
        or len(answers) != count
        or not all(isinstance(a, bytes) for a in answers)
    ):
        raise errors.InvalidRequest(f"expected {count} bencoded answers")
    return answers


def _apply(tracker: Tracker, items: Sequence[Forwarded]) -> list[bytes]:
    """What the serving replica answers each request: exactly what it would answer
    the node had it come straight here (same rules, same counts)."""
    bodies = []
    for i in items:
        body = bittorrent.http_body(tracker, i.path, i.query, i.client_ip, i.identity)
        bodies.append(body or b"")
    return bodies


def answer_batch(tracker: Tracker, items: Sequence[Forwarded]) -> list[bytes]:
    """The serving replica's answers to a standby's forwarded batch."""
    bodies = _apply(tracker, items)
    tracker.metrics.forwarded_applied.inc(len(items))
    tracker.metrics.forwarded_batches.inc()
    return bodies


def decode_relayed(body: bytes) -> list[bytes]:
    """The announce queries of a node relay's batch (`POST /v1/announces`: a msgpack
    list of raw query strings); InvalidRequest if malformed."""
    rows = _unpack(body)
    if not isinstance(rows, list) or not 1 <= len(rows) <= BATCH_MAX:
        raise errors.InvalidRequest(f"a relayed batch is a list of 1 to {BATCH_MAX} queries")
    for query in rows:
        if not isinstance(query, bytes) or len(query) > MAX_QUERY_BYTES:
            raise errors.InvalidRequest(f"a relayed query is bytes of at most {MAX_QUERY_BYTES}")
    return rows


def relayed(queries: Sequence[bytes], client_ip: str, identity: str | None) -> list[Forwarded]:
    """A relay's announces as if the node had sent each itself on its control
    connection: that connection's address and identity (None: a token cluster,
    where the query names the node)."""
    return [Forwarded(ANNOUNCE_PATH, q, client_ip, identity) for q in queries]


def answer_relayed(tracker: Tracker, items: Sequence[Forwarded]) -> list[bytes]:
    """The serving replica's answers to a node relay's batch."""
    bodies = _apply(tracker, items)
    tracker.metrics.relayed.labels("applied").inc(len(items))
    tracker.metrics.relayed_batches.inc()
    return bodies


@dataclass(slots=True)
class _Slot:
    """A node's request waiting on a front for its answer."""

    item: Forwarded
    done: trio.Event = field(default_factory=trio.Event)
    body: bytes | None = None
    result: str = "timeout"
    abandoned: bool = False


class Front:
    """A standby's sender of announces to the replica that serves the term."""

    def __init__(
        self,
        metrics: TrackerMetrics,
        *,
        tls: ReloadingTLS | None = None,
        token: str | None = None,
        timeout_s: float = FORWARD_TIMEOUT_S,
    ) -> None:
        self._metrics = metrics
        self._tls = tls
        self._timeout_s = timeout_s
        self._headers = {"Content-Type": CONTENT_TYPE}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        # host:port of the replica that serves now; None: none known (or this one).
        self.target: str | None = None
        self._send, self._receive = trio.open_memory_channel[_Slot](QUEUE_MAX)
        self._http: httpx.AsyncClient | None = None
        self._generation = -1
        self._retired: list[httpx.AsyncClient] = []

    async def answer(self, item: Forwarded) -> bytes | None:
        """The serving replica's answer to `item`, or None (counted by why) when it
        cannot be had within the front's time limit."""
        if self.target is None:
            self._metrics.front_forwards.labels("no_term").inc()
            return None
        slot = _Slot(item)
        try:
            self._send.send_nowait(slot)
        except trio.WouldBlock:
            self._metrics.front_forwards.labels("busy").inc()
            return None
        with trio.move_on_after(self._timeout_s):
            await slot.done.wait()
        slot.abandoned = True
        self._metrics.front_forwards.labels(slot.result).inc()
        return slot.body

    async def answer_all(self, items: Sequence[Forwarded]) -> list[bytes] | None:
        """The serving replica's answers to every one of `items` (a node relay's
        batch, which the senders batch again), or None if any could not be had."""
        answers: list[bytes | None] = [None] * len(items)

        async def one(n: int) -> None:
            answers[n] = await self.answer(items[n])

        async with trio.open_nursery() as nursery:
            for n in range(len(items)):
                nursery.start_soon(one, n)
        if any(a is None for a in answers):
            return None
        return [a for a in answers if a is not None]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches for good, `SENDERS` at a time."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(SENDERS):
                    nursery.start_soon(self._sender)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for client in [*self._retired, *([self._http] if self._http else [])]:
                    await client.aclose()

    async def _sender(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            size = len(batch[0].item.query)
            while len(batch) < BATCH_MAX and size < BATCH_QUERY_BYTES:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
                size += len(batch[-1].item.query)
            live = [s for s in batch if not s.abandoned]
            if live:
                await self._forward(live)

    def _client(self) -> httpx.AsyncClient:
        """The pool, rebuilt once renewed certificate files were loaded."""
        tls = self._tls
        generation = 0 if tls is None else (tls.client_context(), tls.generation)[1]
        if self._http is None or generation != self._generation:
            if self._http is not None:
                self._retired.append(self._http)
            # The far side is checked by its certificate's role, not its name: a
            # replica is reached at a pod address no certificate needs to carry.
            verify: object = False if tls is None else client_context(
                tls.material, check_hostname=False
            )
            limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
            self._http = httpx.AsyncClient(
                verify=verify,  # type: ignore[arg-type]
                limits=limits,
                trust_env=False,
                follow_redirects=False,
                timeout=self._timeout_s,
            )
            self._generation = generation
        return self._http

    async def _forward(self, slots: list[_Slot]) -> None:
        target = self.target
        result, bodies = "no_term", None
        if target is not None:
            scheme = "http" if self._tls is None else "https"
            body = encode_batch([s.item for s in slots])
            url = f"{scheme}://{target}{FORWARD_PATH}"
            result, bodies = await self._post(url, body, len(slots))
        for n, slot in enumerate(slots):
            slot.result = result
            slot.body = None if bodies is None else bodies[n]
            slot.done.set()

    async def _post(self, url: str, body: bytes, count: int) -> tuple[str, list[bytes] | None]:
        try:
            with trio.fail_after(self._timeout_s):
                response = await self._client().post(url, content=body, headers=self._headers)
                self._check_server(response)
        except (trio.TooSlowError, httpx.TimeoutException):
            return "timeout", None
        except httpx.HTTPError:
            return "unreachable", None
        except errors.Forbidden as e:
            log.warning("tracker: not forwarding announces to %s: %s", url, e)
            return "refused", None
        if response.status_code != 200:
            return "refused", None
        try:
            return "answered", decode_answers(response.content, count)
        except errors.InvalidRequest:
            return "refused", None

    def _check_server(self, response: httpx.Response) -> None:
        """Under TLS, only a tracker of this cluster may receive a node's announces."""
        if self._tls is None:
            return
        stream = response.extensions.get("network_stream")
        ssl_object = None if stream is None else stream.get_extra_info("ssl_object")
        mine = self._tls.identity.cluster
        try:
            who = None if ssl_object is None else peer_identity(ssl_object)
        except CertificateError:
            who = None
        if who is None or who.role != "tracker" or who.cluster != mine:
            raise errors.Forbidden(f"the far side is not a tracker of cluster {mine}")

