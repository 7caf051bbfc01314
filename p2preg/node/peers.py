"""Bringing one blob in from peers, with metainfo the tracker handed out.

Owns the swarm leg of a fetch: check the metainfo against the digest and size,
(in a TLS cluster: an SSL torrent rooted at a CA of ca.crt, nothing else, and
at the CA that issued our certificate, or its peers would refuse us),
let the swarm download it (every piece checked by libtorrent), hash the whole
file against its digest — whoever sent the pieces — and only then link it into
the store. Whatever goes wrong raises `Fallback` with a reason (a metric
label), and the blob's torrent is dropped; the caller (fetch.py) then fetches
from upstream. It must not ask the tracker anything or fetch from upstream.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from p2preg.core.digest import Digest, Hasher
from p2preg.core.metainfo import Metainfo, MetainfoError
from p2preg.node.leasewait import JoinSwarm
from p2preg.node.localanswers import COMPLETED, STARTED, LocalAnswers
from p2preg.node.peertls import PlainTorrents, TorrentRoots
from p2preg.node.seams import Offload, SwarmError, SwarmSeam
from p2preg.node.store import BlobStore, StoreError
from tracker.metainfo import parse_metainfo

HASH_CHUNK = 4 << 20


class Fallback(Exception):
    """The swarm cannot deliver this blob now; fetch it from upstream."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def file_digest(path: Path, algorithm: str) -> Digest:
    """Blocking: the digest of a whole file."""
    h = Hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.digest()


class PeerDownload:
    def __init__(
        self,
        store: BlobStore,
        swarm: SwarmSeam,
        *,
        stall_s: float,
        max_hash_failures: int,
        offload: Offload,
        roots: TorrentRoots | None = None,
        answers: LocalAnswers | None = None,
    ) -> None:
        self._roots = roots or PlainTorrents()
        self._answers = LocalAnswers() if answers is None else answers
        self._store = store
        self._swarm = swarm
        self._stall_s = stall_s
        self._max_hash_failures = max_hash_failures
        self._offload = offload

    async def fetch(self, digest: Digest, size: int, join: JoinSwarm) -> Metainfo:
        """Download, verify and store `digest` with the metainfo of `join`; returns the
        metainfo it came by. When the tracker entered this node in the swarm and named
        its peers (`join.peers`), libtorrent's start is answered with them, and its
        completion too (the seed confirmation that follows carries it): neither
        reaches the tracker."""
        try:
            meta = parse_metainfo(join.metainfo, digest, size, roots=self._roots.roots())
        except MetainfoError as e:
            raise Fallback("bad_metainfo", f"tracker metainfo for {digest}: {e}") from None
        if meta.root_cert != self._roots.root():
            # A CA rotation under way: the swarm's members verify peers against the
            # torrent's root, which did not issue our certificate. Not a bad torrent.
            raise Fallback(
                "root_mismatch", f"the swarm of {digest} is rooted at another CA than ours"
            )
        if join.peers is not None and digest not in self._swarm:
            start_s, seeder_s = join.intervals
            self._answers.expect(meta, STARTED, join.peers, start_s)
            self._answers.expect(meta, COMPLETED, interval_s=seeder_s)
        try:
            return await self._fetch(meta, digest, size)
        except Fallback:
            self._answers.unexpect(meta)
            raise
        finally:
            self._answers.unexpect(meta, STARTED)  # (answered by now, or never sent)

    async def _fetch(self, meta: Metainfo, digest: Digest, size: int) -> Metainfo:
        try:
            path = await self._swarm.download(
                meta, stall_s=self._stall_s, max_hash_failures=self._max_hash_failures
            )
        except SwarmError as e:
            if e.reason != "peers_stalled":  # (kept: the caller may ask the swarm again)
                self._swarm.remove(digest)
            raise Fallback(e.reason, f"swarm download of {digest}: {e}") from None
        got = await self._offload(partial(file_digest, path, digest.algorithm))
        if got != digest:
            self._swarm.remove(digest)
            raise Fallback("digest_mismatch", f"swarm bytes hash to {got}, not {digest}")
        try:
            tmp = await self._offload(partial(self._store.link_verified, digest, path))
            self._store.adopt(digest, tmp, size)
        except StoreError as e:
            self._swarm.remove(digest)
            raise Fallback("store", str(e)) from None
        return meta
