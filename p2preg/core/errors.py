"""The tracker's one exception hierarchy, and what each error means on the wire.

Handlers and the service raise these; exactly two places turn them into bytes:
`tracker.bittorrent` for BitTorrent clients (a bencoded or BEP 15 failure,
always HTTP 200 as BitTorrent clients expect) and `tracker.http_routes` for the
control API (an `ErrorReply` with `status`). `client` maps the `code` of an
`ErrorReply` back to the same class, so node code catches what the tracker
raised. This module must not import anything else of the tracker.
"""

from __future__ import annotations


class TrackerError(Exception):
    """Base: something a client asked for cannot be done. `str(e)` is for humans."""

    status = 400
    code = "invalid_request"


class InvalidRequest(TrackerError):
    """Malformed announce, scrape or control message."""


class Unauthorized(TrackerError):
    status = 401
    code = "unauthorized"


class Forbidden(TrackerError):
    """Authenticated, but not allowed: a request naming another node than its certificate's."""

    status = 403
    code = "forbidden"


class NotFound(TrackerError):
    status = 404
    code = "not_found"


class UnknownTorrent(NotFound):
    """An announce or scrape names an info-hash that no metainfo registered."""

    code = "unknown_torrent"


class InvalidMetainfo(TrackerError):
    status = 422
    code = "invalid_metainfo"


class MetainfoTooLarge(InvalidMetainfo):
    status = 413
    code = "metainfo_too_large"


class InvalidManifest(TrackerError):
    """A manifest body put to the tracker does not hash to the digest it is put under."""

    status = 422
    code = "invalid_manifest"


class ManifestTooLarge(InvalidManifest):
    status = 413
    code = "manifest_too_large"


class MetainfoConflict(TrackerError):
    """A different metainfo is already filed under this digest and not reported bad."""

    status = 409
    code = "metainfo_conflict"


class LeaseLost(TrackerError):
    """The lease expired or was released; another node may hold it now."""

    status = 409
    code = "lease_lost"


class LimitReached(TrackerError):
    """A configured capacity limit (peers, swarms, metainfo) is reached."""

    status = 503
    code = "limit_reached"


class LeaseCapReached(TrackerError):
    """The asking node holds as many open leases as one node may: it fetches from upstream."""

    status = 429
    code = "lease_cap"


class TrackerUnavailable(TrackerError):
    """The tracker could not be reached or failed on its side (client only)."""

    status = 503
    code = "unavailable"


class StandingBy(TrackerUnavailable):
    """Every replica asked stands by while another holds the term (or its term just ended):
    one serves again within about a term, so a node waiting for a lease asks again."""

    code = "standing_by"


class RateLimited(TrackerUnavailable):
    """This identity is over its quota for this kind of request: the tracker is
    unavailable to it for this, for a moment; a node goes on without it (upstream)."""

    status = 429
    code = "rate_limited"


BY_CODE: dict[str, type[TrackerError]] = {
    cls.code: cls
    for cls in (
        TrackerError,
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        UnknownTorrent,
        InvalidMetainfo,
        StandingBy,
        MetainfoTooLarge,
        MetainfoConflict,
        LeaseLost,
        LimitReached,
        LeaseCapReached,
        TrackerUnavailable,
        RateLimited,
        InvalidManifest,
        ManifestTooLarge,
    )
}
