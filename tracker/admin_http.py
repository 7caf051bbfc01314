"""`AdminHttp`: what the tracker's loopback admin listener answers — the cluster page.

Owns the admin port's three answers: `GET /` (and `HEAD`) the cluster page,
`GET /healthz`, and a plain-text 404 or 405 for anything else. The listener
has no authentication, so config.py takes only a loopback address for it, and
nothing here changes state or shows a secret (the token, lease ids, metainfo
bytes stay out of the view). It must not read the tracker beyond
`cluster_view`, render HTML (cluster_page does) or touch sockets
(http_listener does).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tracker.cluster_page import CONTENT_TYPE, render_page, render_standby
from tracker.cluster_view import cluster_view
from tracker.coordinator import Tracker
from tracker.http_protocol import Refusal, Request, Response
from tracker.http_routes import Standby

_TEXT = "text/plain; charset=utf-8"
# Building the page pauses the tracker's loop (about 1.2 µs per live peer on 2
# shared cores: bench/cluster_page.py, docs/TRACKER.md), so a page is served
# again, not rebuilt, for this many times as long as it took to build, and at
# least PAGE_REUSE_MIN_S: reloads cannot take more than a tenth of the loop.
PAGE_REUSE_FACTOR = 10.0
PAGE_REUSE_MIN_S = 1.0
# The admin port reads no bodies.
_MAX_BODY_BYTES = 0


class AdminHttp:
    """The admin listener's app (http_listener.HttpApp)."""

    max_body_bytes = _MAX_BODY_BYTES

    def __init__(
        self,
        tracker: Tracker,
        clock: Callable[[], float],
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tracker = tracker
        # Why this replica shows no page (it stands by: replica.py); None: it serves.
        self.standby: Standby | None = None
        self._clock = clock
        self._timer = timer
        # The last page built, and until when (on `timer`) it is served as it is.
        self._page = b""
        self._page_until = float("-inf")

    def serve(self, tracker: Tracker) -> None:
        """Show `tracker` (a replica's new term) from now on."""
        self._tracker = tracker
        self.standby = None
        self._page_until = float("-inf")

    def page(self) -> bytes:
        """The cluster page: the last one built, if it is recent enough, else a new one."""
        if self.standby is not None:
            return render_standby(self.standby.message)
        started = self._timer()
        if started < self._page_until:
            return self._page
        self._page = render_page(cluster_view(self._tracker, self._clock()))
        took = self._timer() - started
        self._page_until = started + max(PAGE_REUSE_MIN_S, PAGE_REUSE_FACTOR * took)
        return self._page

    def fast_answer(self, target: bytes, ip: str) -> bytes | None:
        return None  # every request gets the full HTTP path

    async def handle(self, request: Request) -> Response:
        if request.path not in ("/", "/healthz"):
            return Response(404, b"not found: the cluster page is at /\n", _TEXT)
        if request.method not in (b"GET", b"HEAD"):
            return Response(405, b"read-only: use GET\n", _TEXT, headers=(("Allow", "GET"),))
        if request.path == "/healthz":
            return Response(200, b"ok\n", _TEXT)
        page = self.page()
        headers = (
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            # No script may run in it, whatever a name smuggled past the escaping.
            ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
        )
        return Response(200, page, CONTENT_TYPE, headers=headers)

    def refuse(self, refusal: Refusal) -> Response:
        return Response(refusal.status, refusal.reason.encode() + b"\n", _TEXT, close=True)
