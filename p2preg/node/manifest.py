"""Manifest media types and the references a manifest holds, sans-IO.

The facade needs three things from a manifest body: its media type (to answer
with the right `Content-Type` from cache), the digests it references (so that
a repository is proven to hold them: the tenancy rule) and a cache key for the
client's `Accept`. Nothing here fetches or stores anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from p2preg.core.digest import Digest, DigestError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# The spec asks registries to accept manifests of at least 4 MiB.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class ManifestInvalid(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Parsed:
    media_type: str
    blobs: frozenset[Digest]  # config and layers
    manifests: frozenset[Digest]  # children of an index
    subject: Digest | None = None
    # An image manifest's config, then its layers in order (each digest once).
    pull_order: tuple[Digest, ...] = ()


def _listed(items: object) -> tuple[Digest, ...]:
    """The digests of a descriptor list, in order, each once."""
    out: dict[Digest, None] = {}
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                try:
                    out[Digest.parse(item["digest"])] = None
                except DigestError:
                    raise ManifestInvalid(f"bad digest {item['digest'][:80]!r}") from None
    return tuple(out)


def _digests(items: object) -> frozenset[Digest]:
    return frozenset(_listed(items))


def parse(body: bytes) -> Parsed:
    """Media type and references of an image manifest or index."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ManifestInvalid("manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        if "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc and "config" in doc:
            media_type = OCI_MANIFEST
        else:
            raise ManifestInvalid("cannot tell the manifest's media type")
    subject = None
    if isinstance(doc.get("subject"), dict):
        (subject,) = _digests([doc["subject"]]) or (None,)
    config = doc.get("config")
    pull_order = _listed(([config] if config else []) + _list(doc.get("layers")))
    return Parsed(
        media_type=media_type,
        blobs=frozenset(pull_order),
        manifests=_digests(doc.get("manifests")),
        subject=subject,
        pull_order=pull_order,
    )


def blob_sizes(body: bytes) -> dict[Digest, int]:
    """The size each config and layer descriptor of an image manifest declares.

    Read only from a manifest verified against its digest: its author's word,
    checked again by the blob's own digest when its bytes arrive.
    """
    doc = json.loads(body)
    sizes: dict[Digest, int] = {}
    if not isinstance(doc, dict):
        return sizes
    config = doc.get("config")
    for item in ([config] if config else []) + _list(doc.get("layers")):
        if not isinstance(item, dict):
            continue
        size = item.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            try:
                sizes[Digest.parse(str(item.get("digest")))] = size
            except DigestError:
                continue
    return sizes


def _list(items: object) -> list[object]:
    return items if isinstance(items, list) else []


def accept_key(accept: str | None) -> str:
    """A canonical form of an `Accept` header for the tag cache.

    Order and whitespace do not change what a registry returns, so they do not
    split the cache; the set of types does (a schema2-only client must never get
    an index that an OCI-aware client caused to be cached).
    """
    if not accept:
        return ""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return ",".join(sorted(t for t in types if t))


# A media range as registries read it (RFC 9110 §12.5.1 tokens), parameters aside;
# RFC 6838 caps type and subtype at 127 characters each.
_MEDIA_RANGE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,127}/[A-Za-z0-9!#$%&'*+.^_`|~-]{1,127}")
MAX_ACCEPT_TYPES = 32


def forwarded_accept(values: Iterable[str]) -> str | None:
    """The `Accept` to send upstream for a client's `Accept` header lines.

    Only well-formed media ranges, in the client's order, once each, without
    parameters (registries choose by type alone). Anything else a client put
    there — non-ASCII bytes, stray commas, 10 KiB of junk — is dropped rather
    than forwarded: the HTTP client refuses some of it outright and the seed
    registry answers some with a 400, which would reach the client as a 5xx.
    """
    types: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            media_type = part.split(";")[0].strip()
            if _MEDIA_RANGE.fullmatch(media_type) and len(types) < MAX_ACCEPT_TYPES:
                types[media_type] = None
    return ", ".join(types) or None


def empty_index() -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()


def filter_index(body: bytes, artifact_type: str | None) -> bytes:
    """An OCI index (referrers response) with only `artifact_type` entries."""
    doc = json.loads(body)
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        manifests = []
    if artifact_type is not None:
        manifests = [
            m for m in manifests if isinstance(m, dict) and m.get("artifactType") == artifact_type
        ]
    out = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(out).encode()
