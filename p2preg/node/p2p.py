"""Getting a blob through the cluster: swarm first, upstream once per cluster.

Owns the node's side of the tracker protocol for one blob: ask for the
upstream lease; if a seeder exists, join the swarm; if this node is granted
the lease, fetch from upstream (renewing the lease with progress), make the
deterministic metainfo from the verified bytes, seed, and publish it; else
wait for the holder. Whatever fails here raises `Fallback` with a reason, and
the caller fetches from upstream: a pull never fails because of the P2P layer.
A blob from peers enters the store only after its whole digest matched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest, Hasher
from p2preg.core.metainfo import Metainfo, MetainfoError
from p2preg.core.wire import LeaseReply, LeaseStatus
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pullorder import Place
from p2preg.node.store import BlobStore, StoreError
from p2preg.node.swarm import Swarm, SwarmError
from tracker.client import TrackerClient
from tracker.metainfo import make_metainfo, parse_metainfo

log = logging.getLogger(__name__)

# How long one lease request may be held open by the tracker.
LONG_POLL_S = 10.0
HASH_CHUNK = 4 << 20
ANNOUNCE_WAIT_S = 10.0
# Filing metainfo the tracker could not take: first retry, and the longest wait.
REFILE_FIRST_S = 1.0
REFILE_MAX_S = 30.0

Progress = Callable[[int], None]
UpstreamFetch = Callable[[Progress], Awaitable[int]]


class Fallback(Exception):
    """The swarm cannot deliver this blob now; fetch it from upstream."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class P2PSettings:
    min_bytes: int
    stall_s: float
    max_hash_failures: int
    lease_wait_max_s: float


def _file_digest(path: Path, algorithm: str) -> Digest:
    h = Hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.digest()


class P2P:
    def __init__(
        self,
        store: BlobStore,
        swarm: Swarm,
        tracker: TrackerClient,
        metrics: NodeMetrics,
        settings: P2PSettings,
        torrent_dir: Path,
        nursery: trio.Nursery,
    ) -> None:
        self._nursery = nursery
        self.store = store
        self.swarm = swarm
        self.tracker = tracker
        self.metrics = metrics
        self.settings = settings
        self.torrent_dir = torrent_dir

    # -- the read path ----------------------------------------------------

    async def fetch(
        self, digest: Digest, size: int, upstream: UpstreamFetch, place: Place | None = None
    ) -> str:
        """Bring `digest` into the store; returns its source, "peers" or "upstream".

        `place` (the image it was asked for in, and where in it) lets the
        tracker order the image's upstream fetches. Waiting for another node's
        upstream fetch lasts as long as that fetch makes progress, or the
        tracker's queue moves; `lease_wait_max_s` without either, and we
        fetch from upstream ourselves.
        """
        group = None if place is None else str(place.image)
        order = 0 if place is None else place.index
        seen: tuple[str | None, int] | None = None
        deadline = trio.current_time() + self.settings.lease_wait_max_s
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise Fallback("lease_wait", "the upstream fetch waited for made no progress")
            wait_s = min(LONG_POLL_S, remaining)
            asked = trio.current_time()
            try:
                reply = await self.tracker.acquire_lease(
                    digest, size=size, wait_s=wait_s, group=group, order=order
                )
            except tracker_errors.TrackerError as e:
                raise Fallback("tracker", f"tracker: {e}") from None
            if reply.status is LeaseStatus.SEEDED:
                await self._from_peers(digest, size, reply)
                return "peers"
            if reply.status is LeaseStatus.GRANTED:
                await self._as_holder(digest, size, reply, upstream)
                return "upstream"
            if (reply.holder, reply.bytes_done) != seen:
                seen = (reply.holder, reply.bytes_done)
                deadline = trio.current_time() + self.settings.lease_wait_max_s
            # A long-poll that ran its course already waited: ask again at once.
            # One answered early (a tracker that does not hold requests) is paced.
            if trio.current_time() - asked < 0.8 * wait_s:
                await trio.sleep(min(max(reply.retry_after_s, 0.05), 1.0))

    async def _from_peers(self, digest: Digest, size: int, reply: LeaseReply) -> None:
        if reply.metainfo is None:
            raise Fallback("bad_metainfo", "tracker said SEEDED without metainfo")
        try:
            meta = parse_metainfo(reply.metainfo, digest, size)
        except MetainfoError as e:
            raise Fallback("bad_metainfo", f"tracker metainfo for {digest}: {e}") from None
        try:
            path = await self.swarm.download(
                meta, stall_s=self.settings.stall_s,
                max_hash_failures=self.settings.max_hash_failures,
            )
        except SwarmError as e:
            self.swarm.remove(digest)
            raise Fallback(e.reason, f"swarm download of {digest}: {e}") from None
        got = await trio.to_thread.run_sync(_file_digest, path, digest.algorithm)
        if got != digest:
            self.swarm.remove(digest)
            raise Fallback("digest_mismatch", f"swarm bytes hash to {got}, not {digest}")
        try:
            tmp = await trio.to_thread.run_sync(self.store.link_verified, digest, path)
            self.store.adopt(digest, tmp, size)
        except StoreError as e:
            self.swarm.remove(digest)
            raise Fallback("store", str(e)) from None
        self.swarm.mark_seeding(digest)
        await trio.to_thread.run_sync(self._save_torrent, meta)

    async def _as_holder(
        self, digest: Digest, size: int, reply: LeaseReply, upstream: UpstreamFetch
    ) -> None:
        assert reply.lease_id is not None
        lease_id = reply.lease_id
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done = n

        async def renew() -> None:
            interval = max(0.5, reply.ttl_s / 3)
            while True:
                await trio.sleep(interval)
                try:
                    await self.tracker.renew_lease(digest, lease_id, done, size)
                except tracker_errors.LeaseLost:
                    log.warning("lease for %s lost while fetching; finishing anyway", digest)
                    return
                except tracker_errors.TrackerError as e:
                    log.warning("lease renewal for %s failed: %s", digest, e)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(renew)
                await upstream(progress)
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._release(digest, lease_id)
            raise
        # Off the upstream link now: tell the tracker, which lets the image's
        # next blob start while this one is published and spreads.
        try:
            await self.tracker.renew_lease(digest, lease_id, size, size)
        except tracker_errors.TrackerError as e:
            log.info("reporting the upstream fetch of %s done: %s", digest, e)
        await self.publish(digest, size)
        self._nursery.start_soon(self._release_once_seeding, digest, lease_id)

    async def _release_once_seeding(self, digest: Digest, lease_id: str) -> None:
        # Hold the lease until the tracker counts us as a seeder: released any
        # sooner, the next asker would find no seeder and fetch upstream again.
        # The client that asked for the blob does not wait for this.
        if not await self.swarm.wait_announced(digest, ANNOUNCE_WAIT_S):
            log.warning("no announce of %s acknowledged within %.0f s", digest, ANNOUNCE_WAIT_S)
        await self._release(digest, lease_id)

    async def _release(self, digest: Digest, lease_id: str) -> None:
        try:
            await self.tracker.release_lease(digest, lease_id)
        except tracker_errors.TrackerError as e:
            log.info("lease release for %s: %s", digest, e)

    # -- seeding ----------------------------------------------------------

    async def publish(self, digest: Digest, size: int) -> None:
        """Seed a verified store blob and file its metainfo with the tracker.

        Our metainfo is made from bytes that matched the digest, so when the
        tracker holds a different one, that one is wrong: report it.
        """
        if digest in self.swarm:
            return
        with self.store.reading(digest) as path:
            meta = await trio.to_thread.run_sync(make_metainfo, path, digest, size)
        # The tracker refuses announces for metainfo it does not hold: file it
        # first, then seed, so the first announce already counts.
        try:
            await self.tracker.publish_metainfo(digest, size, meta.data)
        except tracker_errors.MetainfoConflict:
            await self._report_poisoned(meta)
        except tracker_errors.TrackerError as e:
            # Seed anyway, and keep filing: until the tracker holds the
            # metainfo it refuses our announces and nobody can find this seeder.
            log.warning("publishing metainfo for %s failed (will retry): %s", digest, e)
            self._nursery.start_soon(self._file_later, meta)
        with self.store.reading(digest) as path:
            self.swarm.seed(meta, path)
        await trio.to_thread.run_sync(self._save_torrent, meta)

    async def _file_later(self, meta: Metainfo) -> None:
        """File metainfo the tracker could not take (it was down), while we seed it."""
        delay = REFILE_FIRST_S
        while True:
            await trio.sleep(delay)
            if meta.digest not in self.swarm:
                return  # evicted meanwhile: nothing to announce
            try:
                await self.tracker.publish_metainfo(meta.digest, meta.size, meta.data)
            except tracker_errors.MetainfoConflict:
                await self._report_poisoned(meta)
            except tracker_errors.TrackerError as e:
                delay = min(REFILE_MAX_S, delay * 2)
                log.info("filing metainfo for %s: %s; again in %.0f s", meta.digest, e, delay)
                continue
            log.info("filed metainfo for %s with the tracker", meta.digest)
            # libtorrent backs off a tracker that refused it; announce now.
            self.swarm.reannounce(meta.digest)
            return

    async def _report_poisoned(self, meta: Metainfo) -> None:
        try:
            record = await self.tracker.lookup_metainfo(meta.digest)
            if record is not None and record.metainfo != meta.data:
                bad = record.info_hashes[0] if record.info_hashes else b""
                await self.tracker.report_bad(
                    meta.digest, bad, meta.size, meta.data, "digest_mismatch"
                )
                log.warning("reported poisoned metainfo for %s to the tracker", meta.digest)
        except tracker_errors.TrackerError as e:
            log.warning("reporting bad metainfo for %s failed: %s", meta.digest, e)

    def _torrent_path(self, digest: Digest) -> Path:
        return self.torrent_dir / f"{digest.algorithm}-{digest.hex}.torrent"

    def _save_torrent(self, meta: Metainfo) -> None:
        path = self._torrent_path(meta.digest)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(meta.data)
        os.replace(tmp, path)

    def forget(self, digest: Digest) -> None:
        """The store dropped `digest`: stop seeding it."""
        self.swarm.remove(digest)
        self._torrent_path(digest).unlink(missing_ok=True)

    async def reseed(self) -> int:
        """Seed every stored blob that has a saved torrent, without re-downloading."""
        self.torrent_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for path in sorted(self.torrent_dir.iterdir()):
            if path.suffix != ".torrent":
                path.unlink(missing_ok=True)
                continue
            try:
                digest = Digest.parse(path.stem.replace("-", ":", 1))
            except ValueError:
                path.unlink(missing_ok=True)
                continue
            size = self.store.size(digest)
            if size is None:
                path.unlink(missing_ok=True)
                continue
            try:
                meta = parse_metainfo(path.read_bytes(), digest, size)
            except MetainfoError:
                path.unlink(missing_ok=True)
                continue
            with self.store.reading(digest) as blob:
                self.swarm.seed(meta, blob)
            count += 1
        return count
