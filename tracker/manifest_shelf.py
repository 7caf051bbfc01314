"""The manifest shelf: manifest bodies the cluster fetched from upstream, once each, by digest.

Owns the rules of `PUT /v1/manifests/<digest>`: the body must hash to the
digest it is put under (the tracker hashes it itself), be at most
`MAX_MANIFEST_BYTES` (the OCI distribution spec's advice to registries), and
name its media type and the `"<ns>/<repository>"` place it came from; and the
shelf's bounds — at most `max_count` bodies and `max_bytes` of them, the least
recently used (asked or put) going first. Each body keeps the places nodes said
hold it, newest first, `MAX_PLACES` at most: that is a node's word, which only the
outage fallback uses. The shelf is sans-IO: the coordinator commits what it
changes (`StoredManifest`s, and the digests it dropped) to the store, and loads
it back at start or at a replica's new term. It must not know HTTP or the store.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.reference import InvalidName, parse_name
from tracker.state import StoredManifest

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_PLACES = 16
# type/subtype with the characters RFC 6838 allows (no parameters: manifests have none).
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
# A registry host as a node names it (`?ns=`): a name or address, a port.
_NS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+$")


class Put(NamedTuple):
    """What a put did: the record to commit, whether the digest is new, and whether
    anything changed (nothing to commit when not)."""

    record: StoredManifest
    created: bool
    changed: bool


def check_put(digest: str, msg: wire.PutManifest) -> str:
    """Refuse a body that is not the digest's, too large or badly named; return its place."""
    try:
        expected = Digest.parse(digest)
    except DigestError as e:
        raise errors.InvalidRequest(str(e)) from None
    if len(msg.body) > MAX_MANIFEST_BYTES:
        raise errors.ManifestTooLarge(
            f"manifest body of {len(msg.body)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit"
        )
    if not _MEDIA_TYPE.match(msg.media_type):
        raise errors.InvalidRequest(f"media_type {msg.media_type[:80]!r} is not a media type")
    if not _NS.match(msg.ns):
        raise errors.InvalidRequest(f"ns {msg.ns[:80]!r} is not a registry host")
    try:
        parse_name(msg.repository)
    except InvalidName as e:
        raise errors.InvalidRequest(str(e)) from None
    actual = Digest.of(msg.body, expected.algorithm)
    if actual != expected:
        raise errors.InvalidManifest(f"the body hashes to {actual}, not {expected}")
    return f"{msg.ns}/{msg.repository}"


class ManifestShelf:
    """Verified manifest bodies by digest, bounded in count and bytes (LRU)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredManifest] = OrderedDict()  # oldest use first
        self.bytes = 0
        # Dropped here, not yet from the store (the next commit carries them).
        self._dropped: set[str] = set()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, digest: object) -> bool:
        return digest in self._items

    def get(self, digest: str) -> StoredManifest | None:
        found = self._items.get(digest)
        if found is not None:
            self._items.move_to_end(digest)
        return found

    def put(self, digest: str, media_type: str, body: bytes, place: str, now_unix: float) -> Put:
        """Shelve a checked body (`check_put`) or add `place` to a shelved one."""
        known = self._items.get(digest)
        if known is not None:
            self._items.move_to_end(digest)
            places = (place, *(p for p in known.places if p != place))[:MAX_PLACES]
            if places == known.places:
                return Put(known, created=False, changed=False)
            record = dataclasses.replace(known, places=places, shelved_at_unix=now_unix)
            self._items[digest] = record
            return Put(record, created=False, changed=True)
        if len(body) > self.max_bytes:
            raise errors.ManifestTooLarge(
                f"manifest body of {len(body)} bytes is larger than the whole shelf "
                f"(max_manifest_store_bytes {self.max_bytes})"
            )
        record = StoredManifest(digest, media_type, body, (place,), now_unix)
        self._insert(record)
        return Put(record, created=True, changed=True)

    def forget(self, digest: str) -> None:
        """Take a body off (its commit failed); the store is told with the next commit."""
        record = self._items.pop(digest, None)
        if record is not None:
            self.bytes -= len(record.body)
            self._dropped.add(digest)

    def drops(self) -> list[str]:
        """Digests dropped here that the store may still hold."""
        return sorted(self._dropped)

    def committed(self, drops: Iterable[str]) -> None:
        """The store dropped these too."""
        self._dropped.difference_update(drops)

    def restore(self, records: Iterable[StoredManifest]) -> None:
        """Load what the store kept, oldest first, so the bounds drop the oldest."""
        self._items.clear()
        self.bytes = 0
        for record in sorted(records, key=lambda r: r.shelved_at_unix):
            if len(record.body) <= self.max_bytes:
                self._insert(record)
            else:
                self._dropped.add(record.digest)

    def _insert(self, record: StoredManifest) -> None:
        self._items[record.digest] = record
        self._dropped.discard(record.digest)
        self.bytes += len(record.body)
        while len(self._items) > self.max_count or self.bytes > self.max_bytes:
            digest = next(iter(self._items))
            if digest == record.digest:
                break  # it fits alone (checked before)
            self.forget(digest)
