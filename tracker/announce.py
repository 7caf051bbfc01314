"""HTTP tracker protocol, sans-IO: announce and scrape queries in, bencoded bytes out.

Owns BEP 3 announce parsing, BEP 23/7 compact peer lists, BEP 48 scrape and
bencoded failure reasons, for any HTTP front end (the fast listener and the
control app both call it). It must not look at sockets, headers or the swarm:
the client's address comes from the caller, the peers from the service.
Bencoding is libtorrent's. Parsing is on the hot path of every announce: it
splits the raw query once and decodes only the fields it needs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import libtorrent as lt

from p2preg.core.errors import InvalidRequest

ANNOUNCE_PATH = b"/announce"
# BEP 48: the announce path with "announce" replaced by "scrape".
SCRAPE_PATH = b"/scrape"
MAX_QUERY_BYTES = 4096
# As long as a control message's `node` may be (p2preg.core.wire.STR_LIMITS).
MAX_NODE_CHARS = 128


class Event(enum.IntEnum):
    # Values are BEP 15's, so the UDP codec shares this enum.
    NONE = 0
    COMPLETED = 1
    STARTED = 2
    STOPPED = 3


_EVENTS = {
    b"": Event.NONE,
    b"started": Event.STARTED,
    b"completed": Event.COMPLETED,
    b"stopped": Event.STOPPED,
    # BEP 21's "paused" peer keeps its place; nothing else changes.
    b"paused": Event.NONE,
    b"empty": Event.NONE,
}


@dataclass(frozen=True, slots=True)
class AnnounceRequest:
    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    event: Event
    numwant: int | None
    token: bytes | None
    # The `ip` parameter as sent; the service honours it for trusted sources only.
    claimed_ip: str | None = None
    # The `node` parameter: the node name asserted without TLS (under mutual TLS
    # the client certificate names the node and this is ignored).
    node: str | None = None


@dataclass(frozen=True, slots=True)
class ScrapeRequest:
    info_hashes: tuple[bytes, ...]
    token: bytes | None


@dataclass(frozen=True, slots=True)
class AnnounceResponse:
    """Transport-neutral answer; `peers` are compact entries (6 or 18 bytes)."""

    interval: int
    min_interval: int
    complete: int
    incomplete: int
    peers: list[bytes]


@dataclass(frozen=True, slots=True)
class SwarmStats:
    complete: int
    incomplete: int
    downloaded: int


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """`/announce?x=1` → (`/announce`, `x=1`)."""
    path, _, query = target.partition(b"?")
    return path, query


def parse_announce(query: bytes) -> AnnounceRequest:
    fields = _fields(query)
    info_hash = _hash(fields, b"info_hash")
    peer_id = _unquote(fields.get(b"peer_id"))
    if peer_id is None or len(peer_id) != 20:
        raise InvalidRequest("peer_id must be 20 bytes")
    port = _int(fields, b"port", None)
    if not 0 < port <= 65535:
        raise InvalidRequest("port must be 1 to 65535")
    event = _EVENTS.get(fields.get(b"event", b""))
    if event is None:
        raise InvalidRequest("event must be started, completed or stopped")
    if fields.get(b"compact", b"1") == b"0":
        raise InvalidRequest("this tracker sends compact peer lists only (BEP 23)")
    numwant = _int(fields, b"numwant", -1)
    ip = fields.get(b"ip")
    token = fields.get(b"token")
    node = fields.get(b"node")
    return AnnounceRequest(
        info_hash=info_hash,
        peer_id=peer_id,
        port=port,
        uploaded=_int(fields, b"uploaded", 0),
        downloaded=_int(fields, b"downloaded", 0),
        left=_int(fields, b"left", None),
        event=event,
        numwant=numwant if numwant >= 0 else None,
        token=None if token is None else unquote_to_bytes(token),
        claimed_ip=None if ip is None else unquote_to_bytes(ip).decode("ascii", "replace"),
        node=None if node is None else node_name(unquote_to_bytes(node)),
    )


def node_name(raw: bytes) -> str:
    """An asserted `node=` name, checked as the control API checks a message's `node`."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("node must be UTF-8") from None
    if not 0 < len(name) <= MAX_NODE_CHARS:
        raise InvalidRequest(f"node must be 1 to {MAX_NODE_CHARS} characters")
    return name


def parse_scrape(query: bytes, max_hashes: int) -> ScrapeRequest:
    if len(query) > MAX_QUERY_BYTES:
        raise InvalidRequest("query string is too long")
    hashes: list[bytes] = []
    token = None
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == b"info_hash":
            raw = unquote_to_bytes(value)
            if len(raw) != 20:
                raise InvalidRequest("info_hash must be 20 bytes")
            hashes.append(raw)
        elif key == b"token":
            token = unquote_to_bytes(value)
    if not hashes:
        # BEP 48 lets a tracker decline a full scrape; a private cluster's
        # list of torrents is nobody's business.
        raise InvalidRequest("scrape needs at least one info_hash")
    if len(hashes) > max_hashes:
        raise InvalidRequest(f"scrape takes at most {max_hashes} info_hashes")
    return ScrapeRequest(tuple(dict.fromkeys(hashes)), token)


def encode_announce(response: AnnounceResponse) -> bytes:
    v4 = [p for p in response.peers if len(p) == 6]
    body: dict[bytes, object] = {
        b"interval": response.interval,
        b"min interval": response.min_interval,
        b"complete": response.complete,
        b"incomplete": response.incomplete,
        b"peers": b"".join(v4),
    }
    if len(v4) != len(response.peers):
        body[b"peers6"] = b"".join(p for p in response.peers if len(p) == 18)
    return lt.bencode(cast(Any, body))


def encode_scrape(files: Mapping[bytes, SwarmStats] | Iterable[tuple[bytes, SwarmStats]]) -> bytes:
    items = files.items() if isinstance(files, Mapping) else files
    return lt.bencode(
        cast(
            Any,
            {
                b"files": {
                    ih: {
                        b"complete": s.complete,
                        b"incomplete": s.incomplete,
                        b"downloaded": s.downloaded,
                    }
                    for ih, s in items
                }
            },
        )
    )


def encode_failure(reason: str) -> bytes:
    return lt.bencode(cast(Any, {b"failure reason": reason.encode()}))


def decode_scrape(body: bytes) -> dict[bytes, SwarmStats]:
    """A scrape answer back into stats by info-hash, for clients; a failure raises it."""
    try:
        doc: Any = lt.bdecode(body)
    except RuntimeError as e:
        raise InvalidRequest(f"scrape answer is not bencoded: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("scrape answer is not a bencoded dictionary")
    if b"failure reason" in doc:
        raise InvalidRequest(bytes(doc[b"failure reason"]).decode("utf-8", "replace"))
    files = doc.get(b"files")
    if not isinstance(files, dict):
        raise InvalidRequest("scrape answer has no files")
    out: dict[bytes, SwarmStats] = {}
    stats: Any
    for ih, stats in files.items():
        if not isinstance(stats, dict):
            raise InvalidRequest("scrape answer has a malformed entry")
        out[bytes(ih)] = SwarmStats(
            int(stats.get(b"complete", 0)),
            int(stats.get(b"incomplete", 0)),
            int(stats.get(b"downloaded", 0)),
        )
    return out


def _fields(query: bytes) -> dict[bytes, bytes]:
    if len(query) > MAX_QUERY_BYTES:
        raise InvalidRequest("query string is too long")
    fields: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        fields[key] = value
    return fields


def _unquote(value: bytes | None) -> bytes | None:
    return None if value is None else unquote_to_bytes(value)


def _hash(fields: dict[bytes, bytes], key: bytes) -> bytes:
    raw = _unquote(fields.get(key))
    if raw is None or len(raw) != 20:
        raise InvalidRequest(f"{key.decode()} must be 20 bytes")
    return raw


def _int(fields: dict[bytes, bytes], key: bytes, default: int | None) -> int:
    value = fields.get(key)
    if value is None:
        if default is None:
            raise InvalidRequest(f"missing {key.decode()}")
        return default
    # isdigit also refuses signs, spaces and underscores that int() accepts.
    if not value.isdigit() or len(value) > 19:
        if key == b"numwant" and value[:1] == b"-" and value[1:].isdigit():
            return -1
        raise InvalidRequest(f"{key.decode()} must be a non-negative integer")
    return int(value)
