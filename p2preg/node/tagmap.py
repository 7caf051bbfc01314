"""The tag map: the last digest each tag was seen at, and when a stale one may answer.

Owns the rules for answering a tag: upstream's answer is reused for `ttl_s`
after the node last asked; when upstream then fails in a way that says it is
down (unreachable, timed out, 5xx, 429 — never a 404 or a refusal from a
reachable registry), the last digest it gave is answered for up to `stale_s`
after it last gave it (0: never), and upstream is asked again only a TTL later,
so a tag moved during an outage shows within one TTL once upstream is back.
Keyed on registry, repository, tag and the client's Accept (a schema2-only
client never gets an index another client caused to be cached), bounded (the
least recently confirmed go first). Times are wall-clock seconds, so what
servingstate.py keeps across a restart stays meaningful. Pure: no I/O, no
clock of its own; it must not ask upstream (the resolver does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from p2preg.core.digest import Digest
from p2preg.node.errors import RegistryError, UpstreamServerError, UpstreamUnavailable

MAX_TAG_ENTRIES = 10_000
DEFAULT_STALE_S = 7 * 24 * 3600.0

# registry (the upstream's ns), repository, tag, accept key (manifest.accept_key)
TagKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    seen_at: float  # when upstream last said the tag points there
    checked_at: float  # when upstream was last asked (answered or failed)

    @property
    def is_stale(self) -> bool:
        """Upstream failed when last asked: this is its earlier answer."""
        return self.checked_at > self.seen_at


def stale_allowed(error: RegistryError) -> bool:
    """Whether `error` says upstream is down, so that a stale tag may answer.

    A 404 (ManifestUnknown) or a 401/403 (UpstreamUnauthorized) came from a
    registry that answered: its word stands. A manifest upstream sent that
    does not match its digest is a plain UpstreamError: not an outage either.
    """
    return isinstance(error, (UpstreamUnavailable, UpstreamServerError))


class TagMap:
    def __init__(
        self, *, ttl_s: float, stale_s: float, max_entries: int = MAX_TAG_ENTRIES
    ) -> None:
        if ttl_s < 0 or stale_s < 0 or max_entries < 1:
            raise ValueError("ttl_s and stale_s must be ≥ 0, max_entries ≥ 1")
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.max_entries = max_entries
        self._entries: OrderedDict[TagKey, TagEntry] = OrderedDict()
        # Changes since servingstate.py last took them: an entry, or None for a forgotten one.
        self._unsaved: dict[TagKey, TagEntry | None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: TagKey) -> TagEntry | None:
        return self._entries.get(key)

    def fresh(self, key: TagKey, now: float) -> TagEntry | None:
        """The entry to answer without asking upstream, if the last ask is recent enough.

        One whose last ask failed (`checked_at` after `seen_at`) is a stale
        answer still. A clock that went back counts as not fresh: upstream is asked.
        """
        entry = self._entries.get(key)
        if entry is None or not 0 <= now - entry.checked_at < self.ttl_s:
            return None
        return entry

    def seen(self, key: TagKey, digest: Digest, now: float) -> None:
        """Upstream said `key` points at `digest` now."""
        self._entries[key] = self._unsaved[key] = TagEntry(digest, now, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            # The file keeps the same bound by itself (servingstate.py).
            dropped, _ = self._entries.popitem(last=False)
            self._unsaved.pop(dropped, None)

    def stale(self, key: TagKey, now: float) -> TagEntry | None:
        """The entry to answer with while upstream is down, if it is recent enough.

        Upstream is not asked again for this tag until a TTL from now: a dead
        upstream is not retried on every pull, and a live one is heard within
        a TTL. A clock that went back does not refuse the answer.
        """
        entry = self._entries.get(key)
        if entry is None or now - entry.seen_at > self.stale_s or self.stale_s == 0:
            return None
        self._entries[key] = TagEntry(entry.digest, entry.seen_at, now)
        return entry

    def forget(self, key: TagKey) -> None:
        """Upstream said the tag is not there (404): no stale answer for it later."""
        if self._entries.pop(key, None) is not None:
            self._unsaved[key] = None

    def take_unsaved(self) -> list[tuple[TagKey, TagEntry | None]]:
        """What changed since the last call (None: forgotten); the map forgets it was unsaved."""
        taken = list(self._unsaved.items())
        self._unsaved.clear()
        return taken

    def load(self, rows: Iterable[tuple[TagKey, Digest, float]]) -> None:
        """Entries kept by an earlier run, oldest first; each counts as asked when seen."""
        for key, digest, seen_at in rows:
            self._entries[key] = TagEntry(digest, seen_at, seen_at)
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
