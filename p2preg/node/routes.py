"""The OCI distribution URL space, sans-IO: a request path becomes a `Route`.

Validation happens here, before a name, tag or digest reaches the store, a
cache key or an upstream URL: the facade never forwards input that the spec's
grammar refuses (the seed registry answers some of it with a 500).

A client that sends no `?ns=` (podman, CRI-O, k3s through a `host:port/<ns>`
mirror) names the upstream in the path instead: a first segment equal to a
configured upstream's name, followed by at least one more, picks that upstream
and is stripped once (`/v2/docker.io/library/alpine/...` is `library/alpine` on
`docker.io`). The caller passes no names when `?ns=` is present: it has priority.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from p2preg.core.digest import Digest, DigestError
from p2preg.core.reference import InvalidName, InvalidTag, Reference, parse_name
from p2preg.node.errors import DigestInvalid, NameInvalid, NotFound, TagInvalid, Unsupported

# Whole URL path, before any parsing; longer than any valid one by far.
MAX_PATH_LENGTH = 2048


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    name: str = ""
    reference: Reference | None = None
    # The upstream named by the path's first segment (stripped from `name`), if any.
    upstream: str | None = None

    @property
    def path_name(self) -> str:
        """The repository as the client wrote it in the path, prefix included."""
        return f"{self.upstream}/{self.name}" if self.upstream else self.name

    @property
    def digest(self) -> Digest:
        assert self.reference is not None and self.reference.digest is not None
        return self.reference.digest


_PATTERNS = [
    (Kind.MANIFEST, re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")),
    (Kind.BLOB, re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)$")),
    (Kind.TAGS, re.compile(r"^/v2/(?P<name>.+)/tags/list$")),
    (Kind.REFERRERS, re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<ref>[^/]+)$")),
]
_UPLOADS = re.compile(r"^/v2/.+/blobs/uploads(/.*)?$")
READ_METHODS = frozenset({"GET", "HEAD"})


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except DigestError as e:
        raise DigestInvalid(str(e)) from None


def split_upstream(name: str, upstreams: Collection[str]) -> tuple[str | None, str]:
    """(upstream, repository): the first segment when it names one of `upstreams`."""
    first, sep, rest = name.partition("/")
    if sep and rest and first in upstreams:
        return first, rest
    return None, name


def parse_route(method: str, path: str, upstreams: Collection[str] = ()) -> Route:
    """Map a request to a Route, or raise the RegistryError the client should see.

    `upstreams`: the names a path prefix may pick (empty when `?ns=` chose one).
    """
    if len(path) > MAX_PATH_LENGTH:
        raise NameInvalid("request path is too long")
    if path in ("/v2", "/v2/"):
        route = Route(Kind.BASE)
    elif _UPLOADS.match(path):
        raise Unsupported("this registry is a read-only mirror: pushes are not accepted")
    else:
        for kind, pattern in _PATTERNS:
            m = pattern.match(path)
            if m is not None:
                upstream, name = split_upstream(m.group("name"), upstreams)
                route = _build(kind, name, m.groupdict().get("ref"), upstream)
                break
        else:
            raise NotFound(f"no such endpoint {path[:100]!r}")
    if method not in READ_METHODS:
        raise Unsupported(f"{method} is not supported: this registry is a read-only mirror")
    return route


def _build(kind: Kind, name: str, ref: str | None, upstream: str | None) -> Route:
    try:
        parse_name(name)
    except InvalidName as e:
        raise NameInvalid(str(e)) from None
    if kind is Kind.TAGS:
        return Route(kind, name, upstream=upstream)
    assert ref is not None
    if kind is Kind.MANIFEST and ":" not in ref:
        try:
            return Route(kind, name, Reference.parse(ref), upstream)
        except InvalidTag as e:
            raise TagInvalid(str(e)) from None
    return Route(kind, name, Reference(digest=_digest(ref)), upstream)
