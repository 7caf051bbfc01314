"""The node's announce relay: libtorrent announces to it, the control connection carries them.

Under mutual TLS a direct announce costs the tracker a TLS handshake (libtorrent
closes the connection after each one and resumes no session), about 2.4 ms of
its CPU. The node already keeps a connection to the tracker open for the
control API, with its certificate (or the cluster token) and failover across
every `--tracker`; so libtorrent's one tracker URL is this relay, plain HTTP
on the node's own peer address and a port the kernel picks, and the relay
sends what arrives within `WINDOW_S` (at most `BATCH_MAX`) as one `POST
/v1/announces` through the tracker client (a seeder's periodic refresh is
answered by the relay and sent later, p2preg/node/relay_refresh.py). The
tracker applies each announce under that connection's identity and address,
with its unchanged rules, and the relay hands each bencoded answer back to
libtorrent. The relay forwards only announces of
torrents this node's swarm holds, from its own listen port: anything else
(another local process speaking for the node) gets a bencoded failure and is
counted; `token`, `node` and `ip` parameters are dropped, the client adds the
node's own. It listens where libtorrent's announces come from: libtorrent
announces from each listen socket, bound to that socket's address, so a node
whose `peer_host` is an address (not the wildcard) cannot reach a relay on
127.0.0.1 ("No route to host"). The relay binds to that address (127.0.0.1 for
the wildcard, whose loopback listen socket reaches it) and answers only
connections from that same address: another host cannot send from the
node's own address, so only this machine speaks to it. If no tracker
answers, libtorrent gets a bencoded failure and retries as it would with a
direct announce. An announce whose news a control call already carried (a
followed chunk torrent's, whose peers came with its blob's chunk list; the
start, completion or seeding of a torrent the tracker entered the node in:
localanswers.py) is answered here and never forwarded.

Owns the listener, its minimal HTTP/1.1 (one GET, answered and
closed, as libtorrent asks with `Connection: close`), the guard (`checked`,
sans-IO) and the batching. It must not decide anything an announce means (the
tracker does) nor pick a tracker (the client does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import unquote_to_bytes

import libtorrent as lt
import trio

from p2preg.core import errors
from p2preg.core.pki import CertificateError
from p2preg.node.localanswers import LocalAnswers
from p2preg.node.metrics import NodeMetrics
from p2preg.node.relay_refresh import (
    REFRESH_MAX,
    REFRESH_S,
    REFRESH_TRIES,
    Pending,
    Refreshes,
    fields,
)

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_WILDCARDS = ("", "0.0.0.0", "::")
PATH = b"/announce"  # libtorrent's SSRF check takes a loopback tracker only with this path
# Announces that arrive within this long of the first go in one request: a
# batch costs the tracker about what one announce does over the connection.
WINDOW_S = 0.005
# At most this many per request (the tracker takes up to 128 a batch).
BATCH_MAX = 32
# Requests in flight to the tracker at once (the client's pool keeps them alive).
SENDERS = 2
# Announces waiting for a sender, at most; past it they are answered "busy".
QUEUE_MAX = 4096
# Each tracker gets this long for a batch before the client moves on.
TRACKER_TIMEOUT_S = 4.0
# A libtorrent announce request is ~400 bytes; its head is read within this.
HEAD_MAX_BYTES = 8192
READ_TIMEOUT_S = 5.0
# How long a node that stops waits for the tracker to take its `stopped` announces
# (libtorrent's own stop_tracker_timeout is 1 s), and how often it looks.
LEAVE_S = 2.0
LEAVE_POLL_S = 0.02
# Query parameters the relay drops: the node's identity is the connection's.
_DROPPED = (b"token", b"node", b"ip")
RESULTS = (
    "answered", "held", "local", "unknown_torrent", "other_port", "other_host", "malformed",
    "no_tracker", "busy",
)


def relay_host(peer_host: str) -> str:
    """Where the relay listens for a node whose libtorrent listens on `peer_host`."""
    return LOOPBACK if peer_host in _WILDCARDS else peer_host


class Held(Protocol):
    """What the guard asks of the swarm (and what leaving does to it)."""

    def holds(self, info_hash: bytes) -> bool: ...

    def pause(self) -> int: ...

    def reannounce_hash(self, info_hash: bytes) -> None: ...

    @property
    def listen_ports(self) -> frozenset[int]: ...


class Sender(Protocol):
    """The tracker client's side of a batch."""

    async def announce_batch(self, queries: Sequence[bytes], timeout_s: float) -> list[bytes]: ...


def failure(reason: str) -> bytes:
    return lt.bencode(cast(Any, {b"failure reason": reason.encode()}))


def checked(target: bytes, held: Held | None) -> tuple[bytes | None, str]:
    """The query to forward for a request target, or None and why not (a RESULTS label)."""
    path, _, query = target.partition(b"?")
    if path != PATH or held is None:
        return None, "malformed"
    kept: list[bytes] = []
    info_hash: bytes | None = None
    port: bytes | None = None
    for part in query.split(b"&"):
        key = part.partition(b"=")[0]
        if key in _DROPPED:
            continue
        if key == b"info_hash":
            info_hash = unquote_to_bytes(part[len(key) + 1:])
        elif key == b"port":
            port = part[len(key) + 1:]
        kept.append(part)
    if info_hash is None or len(info_hash) != 20 or port is None or not port.isdigit():
        return None, "malformed"
    # A torrent the swarm just removed (evicted, stopped) says `stopped` after it
    # left the swarm's books: that one goes through, so the tracker drops the peer.
    if not held.holds(info_hash) and b"event=stopped" not in query.split(b"&"):
        return None, "unknown_torrent"
    if len(port) > 5 or int(port) not in held.listen_ports:
        return None, "other_port"
    return b"&".join(kept), "answered"


def parse_head(head: bytes) -> bytes | None:
    """The target of a `GET <target> HTTP/1.x` request head, else None."""
    line = head.partition(b"\r\n")[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
        return None
    return parts[1]


def response(body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    return head + body


@dataclass(slots=True)
class _Slot:
    query: bytes
    done: trio.Event = field(default_factory=trio.Event)
    body: bytes = b""
    refresh: Pending | None = None  # a queued refresh: nobody waits on it


class AnnounceRelay:
    def __init__(
        self,
        tracker: Sender,
        metrics: NodeMetrics,
        *,
        host: str = LOOPBACK,
        window_s: float = WINDOW_S,
        batch_max: int = BATCH_MAX,
        refresh_s: float = REFRESH_S,
        refresh_tries: int = REFRESH_TRIES,
        answers: LocalAnswers | None = None,
    ) -> None:
        self._tracker = tracker
        # What a control call already told the tracker (localanswers.py).
        self.answers = LocalAnswers() if answers is None else answers
        self._metrics = metrics
        self.host = host
        self._window_s = window_s
        self._batch_max = batch_max
        self._refresh_s = refresh_s
        self._refreshes = Refreshes(refresh_tries, refresh_s)
        self._held: Held | None = None  # nothing is forwarded before the swarm is attached
        self._send, self._receive = trio.open_memory_channel[_Slot](QUEUE_MAX)
        self.port = 0
        self._stopped = 0  # `stopped` announces answered
        # Per torrent, its queued refresh on its way to the tracker: the torrent's next
        # ordinary announce waits for it, so a `stopped` sent beside it on the other
        # sender cannot arrive first and be undone by it (the seeder listed again).
        self._in_flight: dict[bytes, _Slot] = {}

    @property
    def url(self) -> str:
        """libtorrent's one tracker URL (no secret in it)."""
        if not self.port:
            raise RuntimeError("the relay is not listening yet")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{PATH.decode()}"

    def attach(self, held: Held) -> None:
        self._held = held

    async def answer(self, target: bytes) -> bytes:
        """The bencoded answer libtorrent gets for a request target."""
        query, result = checked(target, self._held)
        if query is None:
            self._metrics.relay_announces.labels(result).inc()
            return failure(f"the node's announce relay refuses this announce ({result})")
        f = fields(query)
        local = await self.answers.settled(f.info_hash, f.event, TRACKER_TIMEOUT_S)
        if local is not None:
            self._metrics.relay_announces.labels("local").inc()
            return local
        held = self._refreshes.hold(query)
        if held is not None:
            self._metrics.relay_announces.labels("held").inc()
            return held
        info_hash = self._refreshes.forwarding(query)
        while (ahead := self._in_flight.get(info_hash)) is not None:
            await ahead.done.wait()  # bounded: `_forward` settles every slot it sends
        slot = _Slot(query)
        try:
            self._send.send_nowait(slot)
        except trio.WouldBlock:
            self._metrics.relay_announces.labels("busy").inc()
            return failure("the node's announce relay is busy; try again")
        await slot.done.wait()
        if b"&event=stopped" in b"&" + query:
            self._stopped += 1
        return slot.body

    async def leave(self, held: Held) -> None:
        """Pause the swarm and relay its `stopped` announces, a bounded while: the
        session's destructor would wait for them blocking this thread, the relay's."""
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_S):
            want = self._stopped + held.pause()
            for _ in range(int(LEAVE_S / LEAVE_POLL_S)):
                if self._stopped >= want:
                    break
                await trio.sleep(LEAVE_POLL_S)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `host` and forward for good; started with the relay's URL."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for _ in range(SENDERS):
                nursery.start_soon(self._sender)
            nursery.start_soon(self._refresher)
            log.info("relay: libtorrent announces to %s", self.url)
            task_status.started(self.url)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(READ_TIMEOUT_S):
                while b"\r\n\r\n" not in head and len(head) < HEAD_MAX_BYTES:
                    chunk = await stream.receive_some(HEAD_MAX_BYTES)
                    if not chunk:
                        break
                    head += chunk
            target = parse_head(head) if b"\r\n\r\n" in head else None
            if stream.socket.getpeername()[0] != self.host:
                self._metrics.relay_announces.labels("other_host").inc()
                body = failure("the node's announce relay answers its own address only")
            elif target is None:
                self._metrics.relay_announces.labels("malformed").inc()
                body = failure("the node's announce relay takes one GET /announce")
            else:
                body = await self.answer(target)
            with contextlib.suppress(trio.BrokenResourceError):  # libtorrent gave up on it
                await stream.send_all(response(body))

    async def _sender(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            with trio.move_on_after(self._window_s):
                while len(batch) < self._batch_max:
                    batch.append(await self._receive.receive())
            room = min(REFRESH_MAX, 2 * self._batch_max) - len(batch)
            batch += self._refresh_slots(self._refreshes.take(room))
            await self._forward(batch)

    async def _refresher(self) -> None:
        """Queued refreshes that no ordinary batch took go every `refresh_s`."""
        while True:
            await trio.sleep(self._refresh_s)
            for _ in range(SENDERS * 4):  # bounded: a long queue drains over a few rounds
                taken = self._refreshes.take(REFRESH_MAX)
                if not taken or not await self._forward(self._refresh_slots(taken)):
                    break  # a failed batch's refreshes wait for the next one, not this round

    def _refresh_slots(self, taken: list[Pending]) -> list[_Slot]:
        slots = [_Slot(p.query, refresh=p) for p in taken]
        self._in_flight.update((p.info_hash, slot) for p, slot in zip(taken, slots, strict=True))
        return slots

    async def _forward(self, batch: list[_Slot]) -> bool:
        """Send `batch` and settle each of its slots; whether a tracker answered."""
        try:
            try:
                bodies = await self._tracker.announce_batch(
                    [s.query for s in batch], TRACKER_TIMEOUT_S
                )
                result = "answered"
            except (errors.TrackerError, CertificateError) as e:  # (unreadable renewed files)
                log.warning("relay: %d announces got no tracker: %s", len(batch), e)
                bodies = [failure("no tracker answered the node's relay; try again")] * len(batch)
                result = "no_tracker"
            self._metrics.relay_batches.inc()
            ordinary = sum(s.refresh is None for s in batch)
            self._metrics.relay_announces.labels(result).inc(ordinary)
            for slot, body in zip(batch, bodies, strict=True):
                self._settle(slot, body, result == "answered")
            return result == "answered"
        finally:  # settled or not (cancelled), nothing waits on these any longer
            for slot in batch:
                if slot.refresh is not None:
                    info_hash = slot.refresh.info_hash
                    if self._in_flight.get(info_hash) is slot:
                        del self._in_flight[info_hash]
                    slot.done.set()

    def _settle(self, slot: _Slot, body: bytes, answered: bool) -> None:
        if slot.refresh is None:
            self._refreshes.learn(slot.query, body)
            slot.body = body
            slot.done.set()
        elif answered:
            self._refreshes.settled(slot.refresh, body)
        elif self._refreshes.failed(slot.refresh) and self._held is not None:
            # Given up: libtorrent announces it now, as an ordinary announce.
            self._held.reannounce_hash(slot.refresh.info_hash)


@asynccontextmanager
async def open_relay(
    tracker: Sender, metrics: NodeMetrics, host: str = LOOPBACK, **tuning: Any
) -> AsyncIterator[AnnounceRelay]:
    """A relay listening on `host` (its `url` set) and forwarding through `tracker`
    until exit; `tuning`: AnnounceRelay's keyword arguments."""
    relay = AnnounceRelay(tracker, metrics, host=host, **tuning)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        try:
            yield relay
        finally:
            nursery.cancel_scope.cancel()
