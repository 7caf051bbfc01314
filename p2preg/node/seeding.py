"""Seeding verified blobs: their metainfo filed with the tracker, their torrents kept.

Owns `<data_dir>/torrents/` (one `.torrent` per seeded blob, so a restart seeds
again without re-hashing) and the node's side of publishing: the metainfo is
made from store bytes that matched their digest (rooted, in a TLS cluster, at
the CA that issued the node's certificate), filed with the tracker before
the first announce, filed again in the background while the tracker cannot take
it, and — when the tracker holds a different one for the digest — reported as
poisoned. It must not decide whether a blob is published (fetch.py does, once
per fetch) and must not fetch anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.core.hostfiles import private_dir, tighten, write_private
from p2preg.core.metainfo import Metainfo, MetainfoError
from p2preg.node.peertls import PlainTorrents, TorrentRoots
from p2preg.node.seams import Offload, SwarmSeam, TrackerSeam
from p2preg.node.store import BlobStore
from tracker.metainfo import make_metainfo, parse_metainfo

log = logging.getLogger(__name__)

# Filing metainfo the tracker could not take: first retry, and the longest wait.
REFILE_FIRST_S = 1.0
REFILE_MAX_S = 30.0


class TorrentFiles:
    """The `.torrent` of every blob this node seeds, by digest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, digest: Digest) -> Path:
        return self.directory / f"{digest.algorithm}-{digest.hex}.torrent"

    def save(self, meta: Metainfo) -> None:
        """Blocking: write it whole or not at all."""
        path = self.path(meta.digest)
        write_private(path, meta.data)

    def forget(self, digest: Digest) -> None:
        self.path(digest).unlink(missing_ok=True)

    def saved(self) -> Iterator[tuple[Digest, Path]]:
        """Every saved torrent by digest; anything else in the directory is removed."""
        private_dir(self.directory)
        for path in sorted(self.directory.iterdir()):
            try:
                if path.suffix != ".torrent":
                    raise ValueError(path.name)
                digest = Digest.parse(path.stem.replace("-", ":", 1))
            except ValueError:
                path.unlink(missing_ok=True)
                continue
            tighten(path)
            yield digest, path


def stop_seeding(swarm: SwarmSeam, torrents: TorrentFiles, digest: Digest) -> None:
    """The store dropped `digest`: stop seeding it, and do not seed it after a restart."""
    swarm.remove(digest)
    torrents.forget(digest)


class Seeding:
    def __init__(
        self,
        store: BlobStore,
        swarm: SwarmSeam,
        tracker: TrackerSeam,
        torrents: TorrentFiles,
        nursery: trio.Nursery,
        offload: Offload,
        roots: TorrentRoots | None = None,
    ) -> None:
        self._roots = roots or PlainTorrents()
        self._store = store
        self._swarm = swarm
        self._tracker = tracker
        self._torrents = torrents
        self._nursery = nursery
        self._offload = offload

    async def publish(self, digest: Digest, size: int) -> None:
        """Seed a verified store blob and file its metainfo with the tracker.

        Our metainfo is made from bytes that matched the digest, so when the
        tracker holds a different one, that one is wrong: report it.
        """
        if digest in self._swarm:
            return
        with self._store.reading(digest) as path:
            make = partial(make_metainfo, path, digest, size, root=self._roots.root())
            meta = await self._offload(make)
        # The tracker refuses announces for metainfo it does not hold: file it
        # first, then seed, so the first announce already counts.
        try:
            await self._tracker.publish_metainfo(digest, size, meta.data)
        except tracker_errors.MetainfoConflict:
            await self._report_poisoned(meta)
        except tracker_errors.TrackerError as e:
            # Seed anyway, and keep filing: until the tracker holds the
            # metainfo it refuses our announces and nobody can find this seeder.
            log.warning("publishing metainfo for %s failed (will retry): %s", digest, e)
            self._nursery.start_soon(self._file_later, meta)
        with self._store.reading(digest) as path:
            self._swarm.seed(meta, path)
        await self._offload(partial(self._torrents.save, meta))

    async def keep(self, meta: Metainfo) -> None:
        """A blob downloaded from peers entered the store: seed it on, now and after a restart."""
        self._swarm.mark_seeding(meta.digest)
        await self._offload(partial(self._torrents.save, meta))

    async def _file_later(self, meta: Metainfo) -> None:
        """File metainfo the tracker could not take (it was down), while we seed it."""
        delay = REFILE_FIRST_S
        while True:
            await trio.sleep(delay)
            if meta.digest not in self._swarm:
                return  # evicted meanwhile: nothing to announce
            try:
                await self._tracker.publish_metainfo(meta.digest, meta.size, meta.data)
            except tracker_errors.MetainfoConflict:
                await self._report_poisoned(meta)
            except tracker_errors.TrackerError as e:
                delay = min(REFILE_MAX_S, delay * 2)
                log.info("filing metainfo for %s: %s; again in %.0f s", meta.digest, e, delay)
                continue
            log.info("filed metainfo for %s with the tracker", meta.digest)
            # libtorrent backs off a tracker that refused it; announce now.
            self._swarm.reannounce(meta.digest)
            return

    async def _report_poisoned(self, meta: Metainfo) -> None:
        try:
            record = await self._tracker.lookup_metainfo(meta.digest)
            if record is not None and record.metainfo != meta.data:
                bad = record.info_hashes[0] if record.info_hashes else b""
                await self._tracker.report_bad(
                    meta.digest, bad, meta.size, meta.data, "digest_mismatch"
                )
                log.warning("reported poisoned metainfo for %s to the tracker", meta.digest)
        except tracker_errors.TrackerError as e:
            log.warning("reporting bad metainfo for %s failed: %s", meta.digest, e)

    def reseed(self) -> int:
        """Seed every stored blob that has a saved torrent, without re-downloading."""
        count = 0
        # A torrent saved under another CA (a rotation since) is dropped, not seeded.
        roots = self._roots.roots()
        for digest, path in self._torrents.saved():
            size = self._store.size(digest)
            if size is None:
                path.unlink(missing_ok=True)
                continue
            try:
                meta = parse_metainfo(path.read_bytes(), digest, size, roots=roots)
            except MetainfoError:
                path.unlink(missing_ok=True)
                continue
            with self._store.reading(digest) as blob:
                self._swarm.seed(meta, blob)
            count += 1
        return count
