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

from collections.abc import Callable

from tracker.cluster_page import CONTENT_TYPE, render_page
from tracker.cluster_view import cluster_view
from tracker.coordinator import Tracker
from tracker.http_protocol import Refusal, Request, Response

_TEXT = "text/plain; charset=utf-8"
# The admin port reads no bodies.
_MAX_BODY_BYTES = 0


class AdminHttp:
    """The admin listener's app (http_listener.HttpApp)."""

    max_body_bytes = _MAX_BODY_BYTES

    def __init__(self, tracker: Tracker, clock: Callable[[], float]) -> None:
        self._tracker = tracker
        self._clock = clock

    def fast_answer(self, target: bytes, ip: str) -> bytes | None:
        return None  # every request gets the full HTTP path

    async def handle(self, request: Request) -> Response:
        if request.path not in ("/", "/healthz"):
            return Response(404, b"not found: the cluster page is at /\n", _TEXT)
        if request.method not in (b"GET", b"HEAD"):
            return Response(405, b"read-only: use GET\n", _TEXT, headers=(("Allow", "GET"),))
        if request.path == "/healthz":
            return Response(200, b"ok\n", _TEXT)
        page = render_page(cluster_view(self._tracker, self._clock()))
        headers = (
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            # No script may run in it, whatever a name smuggled past the escaping.
            ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
        )
        return Response(200, page, CONTENT_TYPE, headers=headers)

    def refuse(self, refusal: Refusal) -> Response:
        return Response(refusal.status, refusal.reason.encode() + b"\n", _TEXT, close=True)
