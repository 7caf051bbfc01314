"""The tag book: the last tag → digest answer any node heard from its seed registry.

Owns the cluster's memory of tags, for a node that must resolve a tag while
its seed registry is unreachable and has never asked it (docs/SECURITY.md,
"What rests on another node's word"): each `TagSeen` a node reports checked
(registry and repository names, the tag's grammar, the digest) and kept with
who reported it and when, keyed on registry, repository, tag and the client's
Accept (its canonical form: a schema2-only client never gets an index). The
last report wins. Bounded twice: `max_entries` in all, the least recently
reported going first, and `MAX_PER_NODE` for each reporter, its own oldest
going first, so no node pushes out what others reported. Pure: the clock is
the caller's and the store is written by the coordinator, which also restores
the book from it at start; it must not decide who may report (http_routes.py
and the cluster's identity do).
"""

from __future__ import annotations

from collections import OrderedDict

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.reference import InvalidReference, parse_name, parse_tag
from tracker.state import StoredTag

# A node's own tag map holds at most 10,000 tags (p2preg/node/tagmap.py): an
# honest node never reports more than that many live ones.
MAX_PER_NODE = 10_000
# Longest canonical Accept a report may carry (32 media ranges of a typical length).
MAX_ACCEPT_CHARS = 2048

TagKey = tuple[str, str, str, str]  # registry, repository, tag, accept


def key_of(record: StoredTag) -> TagKey:
    return (record.ns, record.repository, record.tag, record.accept)


def _checked_key(ns: str, repository: str, tag: str, accept: str) -> TagKey:
    try:
        parse_name(repository)
        parse_tag(tag)
    except InvalidReference as e:
        raise errors.InvalidRequest(str(e)) from None
    if not ns.isascii() or not ns.isprintable() or "/" in ns:
        raise errors.InvalidRequest(f"registry name {ns[:80]!r} is not a host name")
    if len(accept) > MAX_ACCEPT_CHARS or not accept.isascii() or not accept.isprintable():
        raise errors.InvalidRequest("accept must be printable ASCII of at most 2048 characters")
    return (ns, repository, tag, accept)


def checked(msg: wire.TagSeen, reporter: str, now_unix: float) -> StoredTag:
    """The record a report makes, or InvalidRequest naming what is wrong with it."""
    ns, repository, tag, accept = _checked_key(msg.ns, msg.repository, msg.tag, msg.accept)
    try:
        digest = str(Digest.parse(msg.digest))
    except DigestError as e:
        raise errors.InvalidRequest(f"digest: {e}") from None
    return StoredTag(ns, repository, tag, accept, digest, reporter, now_unix)


def query_key(msg: wire.TagQuery) -> TagKey:
    return _checked_key(msg.ns, msg.repository, msg.tag, msg.accept)


class TagBook:
    def __init__(self, max_entries: int, max_per_node: int = MAX_PER_NODE) -> None:
        if max_entries < 1 or max_per_node < 1:
            raise ValueError("max_entries and max_per_node must be ≥ 1")
        self.max_entries = max_entries
        self.max_per_node = max_per_node
        self._entries: OrderedDict[TagKey, StoredTag] = OrderedDict()
        self._by_node: dict[str, OrderedDict[TagKey, None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: TagKey) -> StoredTag | None:
        return self._entries.get(key)

    def answer(self, key: TagKey, now_unix: float) -> wire.TagAnswer:
        record = self._entries.get(key)
        if record is None:
            return wire.TagAnswer()
        # A clock that went back makes no answer younger than 0.
        age = max(0.0, now_unix - record.seen_at_unix)
        return wire.TagAnswer(record.digest, age, record.reported_by)

    def put(self, record: StoredTag) -> list[TagKey]:
        """Keep `record` (the last report wins); returns the keys dropped to stay bounded."""
        key = key_of(record)
        self._drop(key)
        self._entries[key] = record
        own = self._by_node.setdefault(record.reported_by, OrderedDict())
        own[key] = None
        dropped: list[TagKey] = []
        while len(own) > self.max_per_node:
            oldest = next(iter(own))
            self._drop(oldest)
            dropped.append(oldest)
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            dropped.append(oldest)
        return dropped

    def restore(self, records: list[StoredTag]) -> list[TagKey]:
        """Load what the store kept, oldest report first; returns keys past the bounds."""
        dropped: list[TagKey] = []
        for record in sorted(records, key=lambda r: r.seen_at_unix):
            dropped += self.put(record)
        return dropped

    def _drop(self, key: TagKey) -> None:
        old = self._entries.pop(key, None)
        if old is None:
            return
        own = self._by_node.get(old.reported_by)
        if own is not None:
            own.pop(key, None)
            if not own:
                del self._by_node[old.reported_by]
