"""Seeding verified blobs: their metainfo filed with the tracker, their torrents kept.

Owns `<data_dir>/torrents/` (one `.torrent` per seeded blob, so a restart seeds
again without re-hashing) and the node's side of publishing: the metainfo is
made from store bytes that matched their digest (rooted, in a TLS cluster, at
the CA that issued the node's certificate), filed with the tracker before
the first announce, filed again in the background while the tracker cannot take
it (not when it refuses: only a lease holder defines a first torrent),
confirmed (a blob that came from peers, verified) so the tracker counts us as a
seeder, and — when the tracker holds a different one for the digest — reported
as poisoned (the tracker then has a third node verify), unless the two differ
only in their root (a CA rotation: filed again later, never reported). When the
node's certificate comes from another CA (it was re-issued in a rotation), every
blob it seeds is moved, one at a time, to a torrent rooted there and published
again. It must not decide whether a blob is published (fetch.py does, once per
fetch) and must not fetch anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.config import ConfigError
from p2preg.core.digest import Digest
from p2preg.core.hostfiles import private_dir, tighten, write_private
from p2preg.core.metainfo import Metainfo, MetainfoError
from p2preg.node.localanswers import STARTED, LocalAnswers
from p2preg.node.peertls import PlainTorrents, TorrentRoots
from p2preg.node.seams import Offload, SwarmSeam, TrackerSeam
from p2preg.node.store import BlobStore
from tracker.metainfo import make_metainfo, parse_metainfo

log = logging.getLogger(__name__)

# Filing metainfo the tracker could not take: first retry, and the longest wait.
REFILE_FIRST_S = 1.0
REFILE_MAX_S = 30.0
# The tracker holds the digest rooted at the other CA of a rotation: file ours
# again, backing off to this. Every seeded blob of a node re-issued before the
# tracker does it (docs/OPERATIONS.md says: the tracker first), so it is slow.
REFILE_ROOT_MAX_S = 300.0
# How often the node looks whether its certificate now comes from another CA
# (a clock read; ReloadingTLS stats the files every few seconds).
ROOT_CHECK_INTERVAL_S = 1.0
# A root that is no CA's: what the helpers below say for "none we could use".
UNUSABLE = b""


@dataclass(frozen=True, slots=True)
class Rerooted:
    """One pass over the seeded blobs after the node's CA changed."""

    moved: int
    already: int
    failed: int


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
        answers: LocalAnswers | None = None,
    ) -> None:
        self._roots = roots or PlainTorrents()
        self._answers = LocalAnswers() if answers is None else answers
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
        # Seed first: a tracker that enters us as a seeder with the publish hands us
        # out at once, so the torrent must be in the session by then. Its start waits
        # at the relay for the publish (the tracker refuses announces for metainfo it
        # does not hold yet): answered there with what the publish's answer says,
        # as the announce's would have been, or sent on if it did not enter us.
        self._answers.deciding(meta, STARTED)
        with self._store.reading(digest) as path:
            self._swarm.seed(meta, path)
        try:
            record = await self._tracker.publish_metainfo(digest, size, meta.data)
            if record.seeding:
                counts = (record.seeders, record.leechers)
                self._answers.expect(meta, STARTED, record.peers, record.announce_interval_s,
                                     counts)  # fmt: skip
        except tracker_errors.MetainfoConflict:
            if await self._on_conflict(meta):
                self._nursery.start_soon(self._file_later, meta)
        except tracker_errors.Forbidden as e:
            # Not ours to define (we do not hold the lease): seed anyway; once the
            # holder files this same torrent, libtorrent's next announce counts.
            log.info("not filing metainfo for %s: %s", digest, e)
        except tracker_errors.TrackerError as e:
            # Seed anyway, and keep filing: until the tracker holds the
            # metainfo it refuses our announces and nobody can find this seeder.
            log.warning("publishing metainfo for %s failed (will retry): %s", digest, e)
            self._nursery.start_soon(self._file_later, meta)
        finally:
            self._answers.decided(meta, STARTED)
        await self._offload(partial(self._torrents.save, meta))

    async def keep(self, meta: Metainfo) -> None:
        """A blob downloaded from peers entered the store: seed it on, now and after a
        restart, and tell the tracker we verified it (only then does our `left=0`
        count as a seeder there)."""
        self._swarm.mark_seeding(meta.digest)
        self._nursery.start_soon(self._confirm, meta)
        await self._offload(partial(self._torrents.save, meta))

    async def _confirm(self, meta: Metainfo) -> None:
        try:
            await self._tracker.confirm_seed(meta.digest, meta.info_hash_v2)
        except tracker_errors.TrackerError as e:
            # We still seed; the tracker just hands us out as a downloader, once our
            # libtorrent tells it we seed (the relay may have answered the completion
            # for a confirmation that did not go through).
            log.info("confirming %s with the tracker failed: %s", meta.digest, e)
            self._swarm.reannounce(meta.digest)

    async def _file_later(self, meta: Metainfo) -> None:
        """File metainfo the tracker could not take (it was down, or on the other CA of
        a rotation), while we seed it."""
        delay = REFILE_FIRST_S
        while True:
            await trio.sleep(delay)
            if meta.digest not in self._swarm or meta.root_cert != self._root():
                return  # evicted, or moved to another root, meanwhile
            try:
                await self._tracker.publish_metainfo(meta.digest, meta.size, meta.data)
            except tracker_errors.MetainfoConflict:
                if not await self._on_conflict(meta):
                    return
                delay = min(REFILE_ROOT_MAX_S, delay * 2)
                continue
            except tracker_errors.Forbidden as e:
                log.info("not filing metainfo for %s: %s", meta.digest, e)
                return
            except tracker_errors.TrackerError as e:
                delay = min(REFILE_MAX_S, delay * 2)
                log.info("filing metainfo for %s: %s; again in %.0f s", meta.digest, e, delay)
                continue
            log.info("filed metainfo for %s with the tracker", meta.digest)
            # libtorrent backs off a tracker that refused it; announce now.
            self._swarm.reannounce(meta.digest)
            return

    async def _on_conflict(self, meta: Metainfo) -> bool:
        """The tracker holds other metainfo for the digest: report it as poisoned —
        unless it is for the right size and rooted at another CA than ours, which is
        a CA rotation, not evidence of a bad torrent. True: file ours again later
        (after a rotation, or a report: ours may win the dispute it opened)."""
        try:
            record = await self._tracker.lookup_metainfo(meta.digest)
            if record is None or record.metainfo == meta.data:
                return False
            wrong_size = record.size != meta.size  # a lie whatever its root
            if not wrong_size and await self._offload(
                partial(self._root_of, record.metainfo, meta)
            ) != meta.root_cert:
                log.info(
                    "the tracker holds metainfo for %s rooted at another CA (a CA rotation); "
                    "not reporting it, filing ours again later", meta.digest,
                )
                return True
            bad = record.info_hashes[0] if record.info_hashes else b""
            await self._tracker.report_bad(
                meta.digest, bad, meta.size, meta.data, "digest_mismatch"
            )
            log.warning("reported poisoned metainfo for %s to the tracker", meta.digest)
        except tracker_errors.TrackerError as e:
            log.warning("reporting bad metainfo for %s failed: %s", meta.digest, e)
            return False
        # A report opens a dispute that a third node settles later: keep filing,
        # so that once ours wins, this node is counted as a seeder at once.
        return True

    def _root_of(self, data: bytes, like: Metainfo) -> bytes | None:
        """The root of metainfo for `like`'s blob; UNUSABLE if it is not one we trust."""
        try:
            return parse_metainfo(data, like.digest, like.size, roots=self._roots.roots()).root_cert
        except MetainfoError:
            return UNUSABLE

    def _root(self) -> bytes | None:
        """The root our torrents name now; UNUSABLE while our certificate has none."""
        try:
            return self._roots.root()
        except ConfigError:
            return UNUSABLE

    # -- a CA rotation ---------------------------------------------------------------

    async def follow_root(self) -> None:
        """Run forever: when the node's certificate comes from another CA, re-root."""
        seen = self._root()
        while True:
            await trio.sleep(ROOT_CHECK_INTERVAL_S)
            root = self._root()
            if root in (seen, UNUSABLE):
                continue
            seen = root
            start = trio.current_time()
            done = await self.reroot()
            log.info(
                "tls: the node's certificate comes from another CA now: %d seeded blobs "
                "moved to torrents rooted there and published again (%d already were, "
                "%d failed) in %.1f s",
                done.moved, done.already, done.failed, trio.current_time() - start,
            )

    async def reroot(self) -> Rerooted:
        """Move every seeded blob to a torrent rooted at our CA, one at a time."""
        root = self._root()
        moved = already = failed = 0
        for digest in self._swarm.seeding():
            size = self._store.size(digest)
            if self._root() != root:
                break  # changed again: the next pass takes over
            if size is None:
                continue  # evicted meanwhile
            saved = partial(self._saved_root, digest, size)
            if await self._offload(saved) == root:
                already += 1
                continue
            self._swarm.remove(digest)
            try:
                await self.publish(digest, size)
            except (KeyError, MetainfoError, OSError) as e:
                # Evicted meanwhile, or unreadable: not seeded, not after a restart either.
                failed += 1
                self._torrents.forget(digest)
                log.warning("moving %s to the new CA's torrent failed: %s", digest, e)
                continue
            moved += 1
        return Rerooted(moved, already, failed)

    def _saved_root(self, digest: Digest, size: int) -> bytes | None:
        """Blocking: the root of the torrent saved for `digest`; UNUSABLE if none is."""
        try:
            data = self._torrents.path(digest).read_bytes()
        except OSError:
            return UNUSABLE
        try:
            meta = parse_metainfo(data, digest, size, roots=self._roots.roots())
        except MetainfoError:
            return UNUSABLE
        return meta.root_cert

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
