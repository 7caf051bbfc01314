"""The node's bandwidth caps: peer upload, peer download, upstream download.

Owns the three caps of one node — from its config at start, then from
`PUT /_p2preg/limits?…` (what `p2preg limits set` sends), applied at once — and
the gauges of each cap and of the rate actually reached. The peer caps are
the libtorrent session's rate limits, with every peer, loopback and LAN
included, put in the global peer class they govern; the upstream cap is one
token bucket (rates.py) that every upstream client of the node reads its
response bodies through, so concurrent fetches share it. The endpoint sits on
the facade's loopback listener and needs the node's admin token
(adminauth.py) to read or change. A change lasts until the node stops: the
config's caps come back at the next start. It must not decide what is fetched
from where.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import libtorrent as lt
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from p2preg.core.config import ConfigError
from p2preg.node.adminauth import AdminAuth
from p2preg.node.errors import AdminUnauthorized, RegistryError
from p2preg.node.metrics import NodeMetrics
from p2preg.node.rates import RateMeter, TokenBucket, format_rate, parse_rate

log = logging.getLogger(__name__)

LIMITS_PATH = "/_p2preg/limits"
DIRECTIONS = ("peer_upload", "peer_download", "upstream_download")


class LimitsInvalid(RegistryError):
    status, code = 400, "LIMITS_INVALID"


@dataclass(frozen=True, slots=True)
class Caps:
    """Bytes per second in each direction; 0 is unlimited."""

    peer_upload: int = 0
    peer_download: int = 0
    upstream_download: int = 0

    def changed(self, doc: object) -> Caps:
        """These caps with the directions `doc` names set to its values (rates or their text).

        Raises LimitsInvalid naming the first bad key or value.
        """
        if not isinstance(doc, dict) or not doc:
            raise LimitsInvalid(f"give some of {', '.join(DIRECTIONS)}")
        unknown = sorted(set(doc) - set(DIRECTIONS))
        if unknown:
            raise LimitsInvalid(f"unknown direction {str(unknown[0])[:40]!r}: "
                                f"one of {', '.join(DIRECTIONS)}")
        values = {}
        for key, value in doc.items():
            if not isinstance(value, int | str) or isinstance(value, bool):
                raise LimitsInvalid(f"{key}: give a rate such as 10MiB or 80Mbit")
            try:
                values[key] = parse_rate(value)
            except ConfigError as e:
                raise LimitsInvalid(f"{key}: {e}") from None
        return replace(self, **values)


# -- the peer caps: libtorrent ---------------------------------------------

ALL_V4 = ("0.0.0.0", "255.255.255.255")
ALL_V6 = ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


def cover_every_peer(session: Any) -> None:
    """Put every peer in the global peer class, the one the session's rate limits govern.

    libtorrent's own filter puts local peers (loopback, LAN) in its `local`
    class instead, which those limits do not reach: measured with the 2.1.1
    wheel, 3 MiB under a 256 KiB/s upload limit crossed loopback in 0.55 s
    (21 times the cap); with every address in the global class, in 14.0 s (0.86 of it:
    the limit counts protocol overhead too). Local peers thereby also lose the
    local class's "always unchoked": our unchoke slots (64) cover a cluster.
    """
    rules = lt.ip_filter()
    mask = 1 << int(lt.session.global_peer_class_id)
    rules.add_rule(*ALL_V4, mask)
    rules.add_rule(*ALL_V6, mask)
    session.set_peer_class_filter(rules)


def apply_peer_caps(session: Any, caps: Caps) -> None:
    session.apply_settings(
        {"upload_rate_limit": caps.peer_upload, "download_rate_limit": caps.peer_download}
    )


def peer_rates(session: Any) -> tuple[float, float]:
    """(upload, download) bytes per second over every torrent, protocol overhead included
    (what the caps count), as libtorrent averages them."""
    up = down = 0
    for handle in session.get_torrents():
        status = handle.status()
        up += int(status.upload_rate)
        down += int(status.download_rate)
    return float(up), float(down)


# -- the upstream cap: one bucket for every upstream client -----------------


class UpstreamThrottle:
    """Every upstream body chunk passes `take` before it is used: a reservation in
    the bucket, then a sleep until it is due. FIFO by construction (each take
    queues behind the debt before it); a cap change wakes the sleepers at once."""

    def __init__(self, rate: int) -> None:
        self._bucket = TokenBucket(rate, trio.current_time())
        self._meter = RateMeter()
        self._changed = trio.Event()

    @property
    def rate(self) -> int:
        return self._bucket.rate

    def set_rate(self, rate: int) -> None:
        self._bucket.set_rate(rate, trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    def actual(self) -> float:
        # The wall's monotonic clock, not trio's: a scrape may come from outside the run.
        return self._meter.rate(time.monotonic())

    async def take(self, n: int) -> None:
        wait = self._bucket.take(n, trio.current_time())
        if wait > 0:
            changed = self._changed
            with trio.move_on_after(wait):
                await changed.wait()
        self._meter.add(n, time.monotonic())


# -- the node's caps --------------------------------------------------------


class HasSession(Protocol):
    """The swarm (swarm.py): its session, None once torn down."""

    @property
    def session(self) -> Any: ...


class NodeLimits:
    """The caps in force; `swarm` is None on a node without a tracker.

    It reads the session through the swarm at each use, never keeps it: the
    session's last reference going away is what announces `stopped` (swarm.py).
    """

    def __init__(
        self, caps: Caps, metrics: NodeMetrics, throttle: UpstreamThrottle,
        swarm: HasSession | None,
    ) -> None:
        self._metrics = metrics
        self._throttle = throttle
        self._swarm = swarm
        self.caps = caps
        session = self._session
        if session is not None:
            cover_every_peer(session)
        self._apply(caps)
        rate = metrics.rate
        rate.labels("upstream_download").set_function(throttle.actual)
        rate.labels("peer_upload").set_function(lambda: self._peer_rates()[0])
        rate.labels("peer_download").set_function(lambda: self._peer_rates()[1])

    @property
    def _session(self) -> Any:
        return None if self._swarm is None else self._swarm.session

    def _peer_rates(self) -> tuple[float, float]:
        session = self._session
        return (0.0, 0.0) if session is None else peer_rates(session)

    def _apply(self, caps: Caps) -> None:
        session = self._session
        if session is not None:
            apply_peer_caps(session, caps)
        self._throttle.set_rate(caps.upstream_download)
        for direction, value in asdict(caps).items():
            self._metrics.rate_limit.labels(direction).set(value)
        self.caps = caps

    def set(self, caps: Caps) -> None:
        if caps == self.caps:
            return
        self._apply(caps)
        log.info(
            "limits: %s",
            ", ".join(f"{k} {format_rate(v)}" for k, v in asdict(caps).items()),
        )

    def doc(self) -> dict[str, object]:
        up, down = self._peer_rates()
        return {
            "caps": asdict(self.caps),
            "rates": {
                "peer_upload": round(up),
                "peer_download": round(down),
                "upstream_download": round(self._throttle.actual()),
            },
            "swarm": self._swarm is not None,
        }


def _json(doc: object) -> Response:
    return Response(json.dumps(doc).encode(), 200, {"Content-Type": "application/json"})


def add_limits_routes(app: QuartTrio, limits: NodeLimits, auth: AdminAuth) -> None:
    """`GET` (the caps and the rates now) and `PUT ?peer_upload=RATE&…` (change some
    caps; the others stay) of `/_p2preg/limits`."""

    def check() -> None:
        if not auth.allows(request.headers.get("Authorization")):
            raise AdminUnauthorized("limits need the node's admin token (admin.token)")

    @app.route(LIMITS_PATH, methods=["GET"])
    async def show() -> Response:
        g.route = "limits"
        check()
        return _json(limits.doc())

    @app.route(LIMITS_PATH, methods=["PUT"])
    async def change() -> Response:
        g.route = "limits"
        check()
        # In the query, not a body: the facade takes no request body at all.
        given = list(request.args.items(multi=True))
        doc = dict(given)
        if len(doc) != len(given):
            raise LimitsInvalid("each direction at most once")
        limits.set(limits.caps.changed(doc))
        return _json(limits.doc())
