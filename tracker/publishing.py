"""The metainfo side of the tracker's service: publish, report, settle, reroot, commit.

`Publishing` applies the rules of registry.py (which torrent a digest has) and
disputes.py (who may define it, disputes, quarantines) to one request at a
time and commits each change to the `TrackerStore` before it is served: a
decision is made on memory, then the commit is awaited holding nothing others
wait for but the digest's own next metainfo write. It tells the rest of the
service what changed through narrow callables (wake a digest's lease waiters,
drop a swarm, drop a lease). It must not know about HTTP or encodings
(http_routes.py does), grant leases (coordinator.py does) or hold rules of its
own, and raises only `p2preg.core.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.metainfo import Metainfo, MetainfoError, MetainfoTooLarge
from p2preg.core.tls import TLSFiles
from tracker.config import TrackerConfig
from tracker.disputes import OPENED, Dispute, Quarantines, Settlement, check_definer, verifier_of
from tracker.leases import Lease
from tracker.metainfo import parse_metainfo
from tracker.metrics import TrackerMetrics
from tracker.registry import MetainfoRegistry, Rerooted
from tracker.state import (
    Snapshot,
    StoredDispute,
    StoredMetainfo,
    StoredQuarantine,
    TrackerStore,
)

log = logging.getLogger("p2preg.tracker")


class Publishing:
    def __init__(
        self,
        config: TrackerConfig,
        store: TrackerStore,
        metrics: TrackerMetrics,
        registry: MetainfoRegistry,
        quarantines: Quarantines,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        current_root: Callable[[], bytes | None],
        lease_of: Callable[[str], Lease | None],
        drop_lease: Callable[[Lease], Awaitable[None]],
        passed_from: Callable[[str, str], bool] = lambda digest, identity: False,
        drop_swarm: Callable[[str], None],
        notify: Callable[[str], None],
        confirm: Callable[[str, wire.ConfirmSeed], Awaitable[object]],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.registry = registry
        self.quarantines = quarantines
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        self._current_root = current_root
        self._lease_of = lease_of
        self._drop_lease = drop_lease
        self._passed_from = passed_from
        self._drop_swarm = drop_swarm
        self._notify = notify
        self._confirm = confirm
        # Metainfo writes in flight, by digest: a second write waits for the first.
        self._writing: dict[str, trio.Event] = {}

    def restore(self, snapshot: Snapshot) -> None:
        """Load metainfo, disputes and quarantines; records that no longer validate are
        skipped (with TLS: metainfo rooted at a CA that has left ca.crt since)."""
        roots = self._torrent_roots()
        for rec in snapshot.metainfo:
            try:
                meta = parse_metainfo(rec.data, Digest.parse(rec.digest), rec.size, roots=roots)
            except (DigestError, MetainfoError):
                continue
            self.registry.install(meta, rec.published_by)
        now, wall = self._clock(), self._wall()
        for d in snapshot.disputes:
            try:
                challenger = parse_metainfo(d.data, Digest.parse(d.digest), d.size, roots=roots)
            except (DigestError, MetainfoError):
                continue
            if self.registry.get(d.digest) is not None:
                dispute = Dispute(challenger, d.reported_by, d.reason, d.published_by,
                                  d.opened_at_unix)  # fmt: skip
                self.registry.open_dispute(d.digest, dispute)
        for q in snapshot.quarantines:
            if q.until_unix > wall:
                self.quarantines.add(q.identity, q.digest, now + (q.until_unix - wall))

    async def publish(
        self, digest: str, msg: wire.PublishMetainfo
    ) -> tuple[wire.MetainfoRecord, bool]:
        """File metainfo for a digest; returns (record, newly stored)."""
        meta = self._validate(digest, msg.size, msg.metainfo)
        await self._await_writes(digest)
        holder = self._holder(digest)
        verifier = verifier_of(self.registry.dispute(digest), msg.node, holder)
        try:
            filed = self.registry.check_publish(
                meta, current_root=self._current_root(), verifier=verifier
            )
            if filed is None:
                self.quarantines.check(msg.node, "publish metainfo")
                # A holder whose lease was passed on still files what it finishes.
                if not self._passed_from(digest, msg.node):
                    check_definer(digest, msg.node, holder)
        except (errors.MetainfoConflict, errors.Forbidden) as e:
            self.metrics.metainfo_rejected.labels(e.code).inc()
            raise
        if isinstance(filed, Settlement):
            return await self._settle(digest, filed, msg.node), filed.changed
        if isinstance(filed, Rerooted):
            return await self._reroot(filed.old, meta, msg.node), True
        if filed is not None:
            # The same torrent from another verified copy: that node confirms it.
            await self._confirm(digest, wire.ConfirmSeed(msg.node, meta.info_hash_v2))
            return filed.record, False
        self.registry.reserve(digest)
        try:
            with self._writing_turn(digest):
                await self._store.put_metainfo(self._stored(meta, msg.node))
        finally:
            self.registry.unreserve(digest)
        entry = self.registry.install(meta, msg.node)
        self.metrics.metainfo_published.inc()
        return entry.record, True

    async def _reroot(self, old: Metainfo, meta: Metainfo, node: str) -> wire.MetainfoRecord:
        """A CA rotation: `meta`, rooted at our current CA, takes the place of `old`."""
        digest = str(meta.digest)
        with self._writing_turn(digest):
            await self._store.put_metainfo(self._stored(meta, node))
        entry = self.registry.reroot(old, meta, node)
        # Peers of the old-root torrent cannot verify the new root's members.
        self._drop_swarm(digest)
        self.metrics.metainfo_rerooted.inc()
        self._notify(digest)
        return entry.record

    async def report_bad(self, digest: str, msg: wire.ReportBad) -> wire.MetainfoRecord:
        """Open a dispute: the reporter's torrent is kept beside the stored one until a
        node that is neither side verifies (LeaseStatus.VERIFY). Returns the reporter's."""
        challenger = self._validate(digest, msg.size, msg.metainfo)
        await self._await_writes(digest)
        self.quarantines.check(msg.node, "report metainfo")
        dispute = self.registry.check_report(
            digest, msg.info_hash, challenger, msg.node, reason=msg.reason, at_unix=self._wall()
        )
        if dispute is not None:
            stored = StoredDispute(
                digest, challenger.size, challenger.data, msg.node, msg.reason,
                dispute.published_by, dispute.opened_at_unix,
            )
            with self._writing_turn(digest):
                await self._store.put_dispute(stored)
            self.registry.open_dispute(digest, dispute)
            self.metrics.disputes[OPENED].inc()
            log.warning("tracker: %r disputes %r's metainfo for %s (%s); a third node verifies",
                        msg.node, dispute.published_by, digest, msg.reason[:200])  # fmt: skip
            lease = self._lease_of(digest)
            if lease is not None and dispute.party(lease.holder):
                # A side's fetch cannot settle it: free the lease for a node that can.
                await self._drop_lease(lease)
            self._notify(digest)
        return wire.MetainfoRecord(digest, challenger.size, challenger.data,
                                   list(challenger.swarm_keys))  # fmt: skip

    async def _settle(
        self, digest: str, settlement: Settlement, verifier: str
    ) -> wire.MetainfoRecord:
        winner = settlement.winner
        until = self._wall() + self.quarantines.period_s
        losers = [StoredQuarantine(who, until, digest) for who in settlement.losers]
        record = self._stored(winner, settlement.author) if settlement.changed else None
        with self._writing_turn(digest):
            await self._store.settle_dispute(digest, record, losers)
        entry = self.registry.apply(digest, settlement)
        for who in settlement.losers:
            self.quarantines.add(who, digest)
        if settlement.changed:
            # Peers of the losing torrent cannot help with the winning one.
            self._drop_swarm(digest)
            self.metrics.metainfo_published.inc()
        # The verifier holds the bytes, and so does the author of the torrent that
        # matched them: both count as seeders of it from their next announce.
        for who in sorted({verifier, settlement.author}):
            await self._confirm(digest, wire.ConfirmSeed(who, winner.info_hash_v2))
        self.metrics.disputes[settlement.outcome].inc()
        log.warning("tracker: dispute over %s %s by %r's verification; quarantined for %.0f s: %s",
                    digest, settlement.outcome, verifier, self.quarantines.period_s,
                    ", ".join(repr(w) for w in settlement.losers) or "nobody")  # fmt: skip
        self._notify(digest)
        return entry.record

    def writing(self, digest: str) -> bool:
        """A metainfo write for `digest` is in flight."""
        return digest in self._writing

    async def forget(self, digest: str) -> bool:
        """Expire `digest`'s metainfo (tracker/expiry.py decides when): memory, then store."""
        if digest in self._writing or self.registry.remove(digest) is None:
            return False
        with self._writing_turn(digest):
            await self._store.delete_metainfo(digest)
        return True

    async def _await_writes(self, digest: str) -> None:
        """Let a metainfo write in flight for `digest` finish before deciding on it."""
        while (writing := self._writing.get(digest)) is not None:
            await writing.wait()

    @contextmanager
    def _writing_turn(self, digest: str) -> Iterator[None]:
        """Mark a metainfo write for `digest` in flight; call it right after deciding."""
        assert digest not in self._writing, "decide only after _await_writes"
        done = self._writing[digest] = trio.Event()
        try:
            yield
        finally:
            del self._writing[digest]
            done.set()

    def validate(self, digest: str, size: int, data: bytes) -> Metainfo:
        """`data` as metainfo of `size` bytes under `digest`, by the cluster's rules."""
        return self._validate(digest, size, data)

    def _validate(self, digest: str, size: int, data: bytes) -> Metainfo:
        try:
            return parse_metainfo(
                data,
                Digest.parse(digest),
                size,
                roots=self._torrent_roots(),
                max_bytes=self.config.max_metainfo_bytes,
            )
        except MetainfoError as e:
            too_large = isinstance(e, MetainfoTooLarge)
            err = (errors.MetainfoTooLarge if too_large else errors.InvalidMetainfo)(str(e))
            self.metrics.metainfo_rejected.labels(err.code).inc()
            raise err from None

    def _torrent_roots(self) -> tuple[bytes, ...]:
        """With TLS, torrents must be SSL torrents rooted at a CA of ca.crt (read now:
        a CA rotation adds one without a restart); without TLS, plain torrents only."""
        if self.config.tls_dir is None:
            return ()
        try:
            return (TLSFiles.in_dir(self.config.tls_dir).ca.read_bytes(),)
        except OSError as e:
            raise errors.TrackerUnavailable(f"cannot read ca.crt: {e.strerror}") from None

    def _stored(self, meta: Metainfo, node: str) -> StoredMetainfo:
        return StoredMetainfo(str(meta.digest), meta.size, meta.data, node, self._wall())

    def _holder(self, digest: str) -> str | None:
        lease = self._lease_of(digest)
        return None if lease is None else lease.holder
