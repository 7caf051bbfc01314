"""The metainfo registry: which torrent stands for which blob digest, and which are disputed.

`MetainfoRegistry` owns the digest → metainfo map, the info-hash → digest index
(every info-hash of a hybrid torrent maps to the one digest, so both share one
swarm), the open disputes (a report's torrent kept beside the stored one, see
disputes.py), and the rules that decide a publish or a bad report: idempotent
for the same torrent, refused for another one; a report opens a dispute (one
per digest) and replaces nothing; a publish by the dispute's verifier settles
it; bounded by `max_metainfo`. One exception, for a CA rotation: metainfo rooted
at the tracker's current CA (the one that issued the tracker's own certificate)
replaces metainfo for the same digest rooted at another CA — the cluster is
moving to the new CA, and a root is not evidence about a torrent — but not
while the digest is disputed. It is sans-IO and synchronous: a decision
(`check_*`) and the change that follows it (`install`, `open_dispute`, `apply`)
are separate calls so the caller can commit to the store in between; `reserve`
holds a place under the cap meanwhile. It must not validate bencoding
(tracker.metainfo does), persist anything (the coordinator does, via state.py),
know about peers or leases, or decide who may publish (disputes.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2preg.core import errors, wire
from p2preg.core.metainfo import Metainfo
from tracker.disputes import Dispute, Settlement, settle


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
    """`new` is `old`'s torrent (the same bytes) rooted at the tracker's current CA,
    and `old` is not: a CA rotation. Any member may file it; none can change the
    bytes that way."""
    return (
        current_root is not None
        and new.root_cert == current_root
        and old.root_cert != current_root
        and new.content_hash == old.content_hash
    )


class MetainfoRegistry:
    def __init__(self, max_metainfo: int) -> None:
        self._max = max_metainfo
        self._entries: dict[str, Entry] = {}
        self._by_hash: dict[bytes, str] = {}
        self._disputes: dict[str, Dispute] = {}
        # Digests whose first metainfo is being committed: they count against the cap.
        self._reserved: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> Entry | None:
        return self._entries.get(digest)

    def digest_of(self, info_hash: bytes) -> str | None:
        """The digest whose swarm `info_hash` names; None for an unregistered torrent."""
        return self._by_hash.get(info_hash)

    def dispute(self, digest: str) -> Dispute | None:
        return self._disputes.get(digest)

    def disputes(self) -> int:
        return len(self._disputes)

    def lookup(self, digest: str) -> wire.MetainfoRecord:
        entry = self._entries.get(digest)
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest}")
        return entry.record

    # -- deciding ------------------------------------------------------------------

    def check_publish(
        self,
        meta: Metainfo,
        *,
        current_root: bytes | None = None,
        verifier: str | None = None,
    ) -> Entry | Rerooted | Settlement | None:
        """The entry already filed if it is this very torrent; None if `meta` may be filed
        (by whoever may define the digest's torrent: the caller checks); `Rerooted` if it
        replaces the filed one because of a CA rotation; a `Settlement` if the digest is
        disputed and `verifier` (the identity the tracker asked to verify) made `meta`.

        `current_root` is the CA that issued the tracker's own certificate (None
        without TLS). Raises MetainfoConflict for a torrent that differs from the
        filed one (but for a rotation or a verification), LimitReached when the
        registry is full.
        """
        digest = str(meta.digest)
        entry = self._entries.get(digest)
        dispute = self._disputes.get(digest)
        if entry is not None and dispute is not None and verifier is not None:
            return settle(entry.meta, dispute, meta, verifier)
        if entry is not None:
            if entry.meta.info_hash_v2 == meta.info_hash_v2:
                return entry
            if dispute is not None:
                raise errors.MetainfoConflict(
                    f"the metainfo of {digest} is disputed; a fetch from upstream by a "
                    "node the tracker picks settles it"
                )
            if moves_to_current_root(entry.meta, meta, current_root):
                return Rerooted(entry.meta)
            raise errors.MetainfoConflict(
                f"{digest} already has metainfo with info-hash "
                f"{entry.meta.info_hash_v2.hex()}; a holder of the verified blob can "
                "dispute it by reporting it bad"
            )
        if len(self._entries) + len(self._reserved) >= self._max:
            raise errors.LimitReached("the tracker's metainfo limit is reached")
        return None

    def check_report(
        self,
        digest: str,
        info_hash: bytes,
        challenger: Metainfo,
        reporter: str,
        *,
        reason: str = "",
        at_unix: float = 0.0,
    ) -> Dispute | None:
        """The dispute a report of the stored metainfo (`info_hash`) opens; None if this
        very dispute is open already."""
        entry = self._entries.get(digest)
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest}")
        old = entry.meta
        if info_hash not in (*old.swarm_keys, old.info_hash_v2):
            raise errors.MetainfoConflict(
                f"the metainfo of {digest} is no longer {info_hash.hex()}; look it up again"
            )
        if challenger.info_hash_v2 == old.info_hash_v2:
            raise errors.InvalidMetainfo("the replacement is the metainfo reported bad")
        if reporter == entry.published_by:
            raise errors.InvalidRequest(f"{reporter[:128]!r} published this metainfo itself")
        open_ = self._disputes.get(digest)
        if open_ is not None:
            if open_.challenger.info_hash_v2 == challenger.info_hash_v2:
                return None
            raise errors.MetainfoConflict(
                f"the metainfo of {digest} is disputed already; verification settles it"
            )
        return Dispute(challenger, reporter, reason, entry.published_by, at_unix)

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

    def open_dispute(self, digest: str, dispute: Dispute) -> None:
        self._disputes[digest] = dispute

    def apply(self, digest: str, settlement: Settlement) -> Entry:
        """Close the dispute over `digest` as `settlement` says."""
        self._disputes.pop(digest, None)
        entry = self._entries[digest]
        if not settlement.changed:
            return entry
        return self.reroot(entry.meta, settlement.winner, settlement.author)

    def reroot(self, old: Metainfo, new: Metainfo, published_by: str) -> Entry:
        """Swap `old` for `new` (a CA rotation, a settlement): `old`'s info-hashes go."""
        for key in old.swarm_keys:
            self._by_hash.pop(key, None)
        self._entries.pop(str(old.digest), None)
        return self.install(new, published_by)

    # -- expiry (tracker/expiry.py decides when) -----------------------------------

    def digests(self) -> list[str]:
        """Every digest with metainfo, snapshotted."""
        return list(self._entries)

    def remove(self, digest: str) -> Entry | None:
        """Forget `digest`'s metainfo and its info-hashes (never while it is disputed)."""
        entry = self._entries.pop(digest, None)
        if entry is not None:
            for key in entry.meta.swarm_keys:
                self._by_hash.pop(key, None)
        return entry
