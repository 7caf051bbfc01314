"""BitTorrent answers over both transports: a request in, the answer's bytes out.

Owns the one place where a `TrackerError` becomes what a BitTorrent client
reads: a bencoded `failure reason` (sent with HTTP 200, as clients expect) or a
BEP 15 error packet, counted per transport and code. Decoding and encoding are
announce.py's and udp.py's, the decisions the coordinator's; this module must
not touch sockets or HTTP framing (http_listener, http_routes, udp_listener do).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from p2preg.core import errors
from tracker import udp
from tracker.announce import (
    ANNOUNCE_PATH,
    SCRAPE_PATH,
    ScrapeRequest,
    SwarmStats,
    encode_announce,
    encode_failure,
    encode_scrape,
    parse_announce,
    parse_scrape,
)
from tracker.coordinator import Tracker

PATHS = (ANNOUNCE_PATH, SCRAPE_PATH)


def http_body(
    tracker: Tracker, path: bytes, query: bytes, ip: str, identity: str | None = None
) -> bytes | None:
    """Bencoded answer to an announce or scrape; None for any other path.

    `identity` is the client certificate's node under mutual TLS.
    """
    try:
        if path == ANNOUNCE_PATH:
            asked = parse_announce(query)
            return encode_announce(tracker.announce(asked, ip, "http", identity=identity))
        if path == SCRAPE_PATH:
            req = parse_scrape(query, tracker.config.max_scrape_hashes)
            stats = tracker.scrape(req, "http")
            return encode_scrape([(ih, s) for ih, s in stats if s is not None])
    except errors.TrackerError as e:
        tracker.metrics.failure("http", e.code).inc()
        return encode_failure(str(e))
    return None


def udp_answer(
    tracker: Tracker, ids: udp.ConnectionIds, wall_clock: Callable[[], float] = time.time
) -> Callable[[bytes, tuple[str, int]], bytes | None]:
    """The UDP listener's `answer`: a datagram in, the reply datagram (or None) out."""

    def answer(packet: bytes, addr: tuple[str, int]) -> bytes | None:
        host = addr[0]
        tid = udp.transaction_id(packet)
        if tid is None:
            return None  # too short to address a reply
        try:
            req = udp.parse_request(packet)
            now = wall_clock()
            if isinstance(req, udp.Connect):
                return udp.encode_connect(tid, ids.issue(host, now))
            if not ids.valid(req.connection_id, host, now):
                raise errors.InvalidRequest("unknown or expired connection id")
            if isinstance(req, udp.Announce):
                response = tracker.announce(req.request, host, "udp")
                ipv6 = ":" in host and not host.startswith("::ffff:")
                return udp.encode_announce(tid, response, ipv6=ipv6)
            stats = tracker.scrape(ScrapeRequest(req.info_hashes, None), "udp")
            zero = SwarmStats(0, 0, 0)
            return udp.encode_scrape(tid, [s or zero for _, s in stats])
        except errors.TrackerError as e:
            tracker.metrics.failure("udp", e.code).inc()
            return udp.encode_error(tid, str(e))

    return answer
