"""The metainfo registry: which torrent stands for which blob digest, and which were bad.

`MetainfoRegistry` owns the digest → metainfo map, the info-hash → digest index
(every info-hash of a hybrid torrent maps to the one digest, so both share one
swarm), the info-hashes reported bad per digest, and the rules that decide a
publish or a bad report: idempotent for the same torrent, refused for another
one unless the stored one is reported bad, never again for one reported bad,
bounded by `max_metainfo`. One exception, for a CA rotation: metainfo rooted at
the tracker's current CA (the one that issued the tracker's own certificate)
replaces metainfo for the same digest rooted at another CA — the cluster is
moving to the new CA, and a root is not evidence about a torrent, so nothing is
marked bad. It is sans-IO and synchronous: a decision (`check_*`)
and the change that follows it (`install`, `replace`) are separate calls so the
caller can commit to the store in between; `reserve` holds a place under the
cap meanwhile. It must not validate bencoding (tracker.metainfo does), persist
anything (the coordinator does, via state.py) or know about peers or leases.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2preg.core import errors, wire
from p2preg.core.metainfo import Metainfo


@dataclass(frozen=True, slots=True)
class Entry:
    meta: Metainfo
    published_by: str

    @property
    def record(self) -> wire.MetainfoRecord:
        meta = self.meta
        return wire.MetainfoRecord(str(meta.digest), meta.size, meta.data, list(meta.swarm_keys))


@dataclass(frozen=True, slots=True)
class Rerooted:
    """The publish replaces `old`, rooted at a CA the tracker has moved away from."""

    old: Metainfo


def moves_to_current_root(old: Metainfo, new: Metainfo, current_root: bytes | None) -> bool:
    """`new` is rooted at the tracker's current CA and `old` is not: a CA rotation."""
    return (
        current_root is not None
        and new.root_cert == current_root
        and old.root_cert != current_root
    )


class MetainfoRegistry:
    def __init__(self, max_metainfo: int) -> None:
        self._max = max_metainfo
        self._entries: dict[str, Entry] = {}
        self._by_hash: dict[bytes, str] = {}
        self._bad: dict[str, set[bytes]] = {}
        # Digests whose first metainfo is being committed: they count against the cap.
        self._reserved: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> Entry | None:
        return self._entries.get(digest)

    def digest_of(self, info_hash: bytes) -> str | None:
        """The digest whose swarm `info_hash` names; None for an unregistered torrent."""
        return self._by_hash.get(info_hash)

    def lookup(self, digest: str) -> wire.MetainfoRecord:
        entry = self._entries.get(digest)
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest}")
        return entry.record

    # -- deciding ------------------------------------------------------------------

    def check_publish(
        self, meta: Metainfo, *, current_root: bytes | None = None
    ) -> Entry | Rerooted | None:
        """The entry already filed if it is this very torrent; None if `meta` may be filed;
        `Rerooted` if it replaces the filed one because of a CA rotation.

        `current_root` is the CA that issued the tracker's own certificate (None
        without TLS). Raises MetainfoConflict for a torrent reported bad or one
        that differs from the filed one (but for a rotation), LimitReached when
        the registry is full.
        """
        digest = str(meta.digest)
        if meta.info_hash_v2 in self._bad.get(digest, ()):
            raise errors.MetainfoConflict(f"this metainfo for {digest} was reported bad")
        entry = self._entries.get(digest)
        if entry is not None:
            if entry.meta.info_hash_v2 == meta.info_hash_v2:
                return entry
            if moves_to_current_root(entry.meta, meta, current_root):
                return Rerooted(entry.meta)
            raise errors.MetainfoConflict(
                f"{digest} already has metainfo with info-hash "
                f"{entry.meta.info_hash_v2.hex()}; only a holder of the verified blob "
                "can replace it, by reporting it bad"
            )
        if len(self._entries) + len(self._reserved) >= self._max:
            raise errors.LimitReached("the tracker's metainfo limit is reached")
        return None

    def check_report(self, digest: str, info_hash: bytes, replacement: Metainfo) -> Metainfo:
        """The stored metainfo that `replacement` may replace, as reported bad by `info_hash`."""
        entry = self._entries.get(digest)
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest}")
        old = entry.meta
        if info_hash not in (*old.swarm_keys, old.info_hash_v2):
            raise errors.MetainfoConflict(
                f"the metainfo of {digest} is no longer {info_hash.hex()}; look it up again"
            )
        if replacement.info_hash_v2 == old.info_hash_v2:
            raise errors.InvalidMetainfo("the replacement is the metainfo reported bad")
        if replacement.info_hash_v2 in self._bad.get(digest, ()):
            raise errors.MetainfoConflict(f"the replacement for {digest} was reported bad too")
        return old

    # -- changing ------------------------------------------------------------------

    def reserve(self, digest: str) -> None:
        """Hold a place under the cap while `digest`'s first metainfo is committed."""
        self._reserved.add(digest)

    def unreserve(self, digest: str) -> None:
        self._reserved.discard(digest)

    def install(self, meta: Metainfo, published_by: str) -> Entry:
        digest = str(meta.digest)
        entry = self._entries[digest] = Entry(meta, published_by)
        for key in meta.swarm_keys:
            self._by_hash[key] = digest
        return entry

    def replace(self, old: Metainfo, new: Metainfo, published_by: str) -> Entry:
        """Swap a torrent reported bad for its replacement; the old one stays bad."""
        self.mark_bad(str(old.digest), old.info_hash_v2)
        return self.reroot(old, new, published_by)

    def reroot(self, old: Metainfo, new: Metainfo, published_by: str) -> Entry:
        """Swap `old` for `new` (a CA rotation): `old`'s info-hashes name no swarm now."""
        for key in old.swarm_keys:
            self._by_hash.pop(key, None)
        self._entries.pop(str(old.digest), None)
        return self.install(new, published_by)

    def mark_bad(self, digest: str, info_hash_v2: bytes) -> None:
        self._bad.setdefault(digest, set()).add(info_hash_v2)

    # -- expiry (tracker/expiry.py decides when) -----------------------------------

    def digests(self) -> list[str]:
        """Every digest with metainfo, snapshotted."""
        return list(self._entries)

    def remove(self, digest: str) -> Entry | None:
        """Forget `digest`'s metainfo and its info-hashes (its bad reports stay)."""
        entry = self._entries.pop(digest, None)
        if entry is not None:
            for key in entry.meta.swarm_keys:
                self._by_hash.pop(key, None)
        return entry
