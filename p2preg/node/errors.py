"""The node's one exception hierarchy and its mapping to OCI error bodies.

Handlers raise a `RegistryError`; the facade turns it into the status code and
`{"errors": [...]}` body of the OCI distribution spec in one place. Nothing
here knows about HTTP frameworks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class RegistryError(Exception):
    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class TagInvalid(RegistryError):
    status, code = 400, "TAG_INVALID"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class PaginationInvalid(RegistryError):
    status, code = 400, "PAGINATION_NUMBER_INVALID"


class AdminUnauthorized(RegistryError):
    """An admin endpoint without the node's admin token."""

    status, code = 401, "UNAUTHORIZED"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="p2preg-admin"'})


class Denied(RegistryError):
    status, code = 403, "DENIED"


class NameUnknown(RegistryError):
    status, code = 404, "NAME_UNKNOWN"


class BlobUnknown(RegistryError):
    status, code = 404, "BLOB_UNKNOWN"


class ManifestUnknown(RegistryError):
    status, code = 404, "MANIFEST_UNKNOWN"


class NotFound(RegistryError):
    status, code = 404, "NOT_FOUND"


class Unsupported(RegistryError):
    status, code = 405, "UNSUPPORTED"


class RangeNotSatisfiable(RegistryError):
    status, code = 416, "RANGE_INVALID"


class TooManyRequests(RegistryError):
    status, code = 429, "TOOMANYREQUESTS"


class UpstreamUnauthorized(RegistryError):
    """The seed registry refused our credentials; the client cannot fix that."""

    status, code = 403, "DENIED"


class UpstreamError(RegistryError):
    """The seed registry failed or sent something we cannot trust."""

    status, code = 502, "UNAVAILABLE"


class UpstreamServerError(UpstreamError):
    """The seed registry (or its token service) answered 5xx: it failed, not us."""


class UpstreamUnavailable(RegistryError):
    """The seed registry was unreachable, timed out, or rate-limited us."""

    status, code = 503, "UNAVAILABLE"


class StoreFull(RegistryError):
    status, code = 507, "UNAVAILABLE"
