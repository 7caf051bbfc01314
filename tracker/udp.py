"""UDP tracker protocol (BEP 15) with URL data (BEP 41), sans-IO.

Owns the packet formats — connect, announce, scrape, error — and stateless
connection ids: an id is a keyed hash of the client's IP (not its port:
libtorrent shares ids between the sockets, even the sessions, of a process,
and NATs move ports) and a time window, so the tracker keeps no per-client
state and a spoofed source address never gets an id (BEP 15's purpose). The
cluster token travels in the announce's BEP 41 URL data (`/announce?token=`),
which libtorrent copies from the tracker URL. This module must not touch
sockets or the swarm; the listener feeds it datagrams and the service answers.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import struct
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from p2preg.core.errors import InvalidRequest
from tracker.announce import AnnounceRequest, AnnounceResponse, Event, SwarmStats, node_name

PROTOCOL_ID = 0x41727101980
CONNECT, ANNOUNCE, SCRAPE, ERROR = 0, 1, 2, 3
# BEP 15: a connection id is good for at least a minute after it was issued.
ID_WINDOW_S = 60
# BEP 15 packs at most about 74 info-hashes into one scrape.
MAX_SCRAPE_HASHES = 74

_CONNECT_REQ = struct.Struct(">QII")
_CONNECT_RESP = struct.Struct(">IIQ")
_ANNOUNCE_REQ = struct.Struct(">QII20s20sQQQIIIiH")
_ANNOUNCE_RESP = struct.Struct(">IIIII")
_HEADER = struct.Struct(">II")
_SCRAPE_ENTRY = struct.Struct(">III")
_EVENTS = {0: Event.NONE, 1: Event.COMPLETED, 2: Event.STARTED, 3: Event.STOPPED}


@dataclass(frozen=True, slots=True)
class Connect:
    transaction_id: int


@dataclass(frozen=True, slots=True)
class Announce:
    connection_id: int
    transaction_id: int
    request: AnnounceRequest


@dataclass(frozen=True, slots=True)
class Scrape:
    connection_id: int
    transaction_id: int
    info_hashes: tuple[bytes, ...]


class ConnectionIds:
    """Issue and check connection ids without remembering any."""

    # Remembered ids per window; a cache, not state: losing it costs a hash.
    MAX_CACHED = 65536

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self._cache: dict[tuple[str, int], int] = {}

    def _id(self, host: str, window: int) -> int:
        # Keyed BLAKE2b twice per announce was 8% of a UDP announce (py-spy).
        cid = self._cache.get((host, window))
        if cid is None:
            h = hashlib.blake2b(f"{host}|{window}".encode(), key=self._key, digest_size=8)
            cid = int.from_bytes(h.digest(), "big")
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            self._cache[host, window] = cid
        return cid

    def issue(self, host: str, now: float) -> int:
        return self._id(host, int(now // ID_WINDOW_S))

    def valid(self, connection_id: int, host: str, now: float) -> bool:
        window = int(now // ID_WINDOW_S)
        # The current window or the one before: an id lives 1 to 2 minutes.
        return connection_id in (self._id(host, window), self._id(host, window - 1))


def transaction_id(packet: bytes) -> int | None:
    """The transaction id of a request, to address an error reply; None if too short."""
    return int.from_bytes(packet[12:16], "big") if len(packet) >= 16 else None


def parse_request(packet: bytes) -> Connect | Announce | Scrape:
    if len(packet) < 16:
        raise InvalidRequest("packet is shorter than 16 bytes")
    connection_id, action, tid = _CONNECT_REQ.unpack_from(packet)
    if action == CONNECT:
        if connection_id != PROTOCOL_ID:
            raise InvalidRequest("connect without the BEP 15 protocol id")
        return Connect(tid)
    if action == ANNOUNCE:
        if len(packet) < _ANNOUNCE_REQ.size:
            raise InvalidRequest("announce is shorter than 98 bytes")
        (
            _,
            _,
            _,
            info_hash,
            peer_id,
            downloaded,
            left,
            uploaded,
            event,
            ip,
            _key,
            numwant,
            port,
        ) = _ANNOUNCE_REQ.unpack_from(packet)
        if event not in _EVENTS:
            raise InvalidRequest("unknown announce event")
        if port == 0:
            raise InvalidRequest("port must be 1 to 65535")
        url = _url_data(packet, _ANNOUNCE_REQ.size)
        token = _param(url, b"token")
        node = _param(url, b"node")
        request = AnnounceRequest(
            info_hash=info_hash,
            peer_id=peer_id,
            port=port,
            uploaded=uploaded,
            downloaded=downloaded,
            left=left,
            event=_EVENTS[event],
            numwant=numwant if numwant >= 0 else None,
            token=token,
            claimed_ip=socket.inet_ntoa(ip.to_bytes(4, "big")) if ip else None,
            node=None if node is None else node_name(node),
        )
        return Announce(connection_id, tid, request)
    if action == SCRAPE:
        body = packet[16:]
        if not body or len(body) % 20:
            raise InvalidRequest("scrape must carry whole 20-byte info-hashes")
        if len(body) > 20 * MAX_SCRAPE_HASHES:
            raise InvalidRequest(f"scrape takes at most {MAX_SCRAPE_HASHES} info-hashes")
        return Scrape(connection_id, tid, tuple(body[i : i + 20] for i in range(0, len(body), 20)))
    raise InvalidRequest(f"unknown action {action}")


def encode_connect(tid: int, connection_id: int) -> bytes:
    return _CONNECT_RESP.pack(CONNECT, tid, connection_id)


def encode_announce(tid: int, response: AnnounceResponse, *, ipv6: bool) -> bytes:
    # BEP 15 over IPv4 carries 6-byte peers only, over IPv6 18-byte ones.
    width = 18 if ipv6 else 6
    peers = b"".join(p for p in response.peers if len(p) == width)
    head = _ANNOUNCE_RESP.pack(
        ANNOUNCE, tid, response.interval, response.incomplete, response.complete
    )
    return head + peers


def encode_scrape(tid: int, stats: list[SwarmStats]) -> bytes:
    return _HEADER.pack(SCRAPE, tid) + b"".join(
        _SCRAPE_ENTRY.pack(s.complete, s.downloaded, s.incomplete) for s in stats
    )


def encode_error(tid: int, message: str) -> bytes:
    return _HEADER.pack(ERROR, tid) + message.encode()[:512]


def _url_data(packet: bytes, at: int) -> bytes:
    """Concatenated BEP 41 URL data options after the fixed announce fields."""
    url = b""
    n = len(packet)
    while at < n:
        option = packet[at]
        if option == 0:  # end of options
            break
        if option == 1:  # no-op
            at += 1
            continue
        if at + 1 >= n:
            raise InvalidRequest("truncated BEP 41 option")
        length = packet[at + 1]
        if option == 2:
            url += packet[at + 2 : at + 2 + length]
        at += 2 + length
    return url


def _param(url: bytes, name: bytes) -> bytes | None:
    """A query parameter of the BEP 41 URL data (`token`, `node`), unquoted."""
    _, _, query = url.partition(b"?")
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == name:
            return unquote_to_bytes(value)
    return None
