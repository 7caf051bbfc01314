"""A node's seeding in a CA rotation (p2preg/node/seeding.py), in process over the fakes.

When the node's root changes, every seeded blob is moved to a torrent rooted
at the new CA (the saved `.torrent` too), once: a second pass finds nothing to
move. A tracker that holds the digest under the other root is not reported
(the fake tracker, like a tracker still on the old CA, refuses the new root's
metainfo as a conflict); a same-root conflict still is.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from harness.tlscerts import ClusterCA
from p2preg.core.digest import Digest
from p2preg.core.metainfo import canonical_roots
from p2preg.node.seeding import Rerooted, Seeding, TorrentFiles
from p2preg.node.store import BlobStore
from tests.fakes import FakeSwarm, FakeTrackerServer, inline
from tracker.metainfo import make_metainfo, parse_metainfo


class Roots:
    """TorrentRoots whose current root the test moves."""

    def __init__(self, root: bytes, trusted: bytes) -> None:
        self.current, self.trusted = root, trusted

    def root(self) -> bytes:
        return self.current

    def roots(self) -> tuple[bytes, ...]:
        return canonical_roots([self.trusted])


def _store_blob(store: BlobStore, size: int) -> Digest:
    data = os.urandom(size)
    digest = Digest.of(data)
    writer = store.writer(digest)
    writer.write(data)
    writer.finish()
    writer.commit()
    return digest


async def test_a_new_root_moves_every_seeded_blob_once_and_reports_nothing(
    tmp_path: Path,
) -> None:
    old, new = ClusterCA.make("rot"), ClusterCA.make("rot")
    roots = Roots(canonical_roots([old.cert_pem])[0], old.cert_pem + new.cert_pem)
    server = FakeTrackerServer()
    store = BlobStore(tmp_path / "data", 1 << 30)
    store.open()
    swarm = FakeSwarm("a", tmp_path / "swarm", server)
    torrents = TorrentFiles(tmp_path / "data" / "torrents")
    async with trio.open_nursery() as nursery:
        seeding = Seeding(store, swarm, server.client("a"), torrents, nursery, inline, roots)
        assert seeding.reseed() == 0  # as a node starts: makes the torrents directory
        digests = [_store_blob(store, n) for n in (100_000, 200_000)]
        for digest in digests:
            await seeding.publish(digest, store.size(digest) or 0)
        assert await seeding.reroot() == Rerooted(0, 2, 0)  # nothing to move yet
        roots.current = canonical_roots([new.cert_pem])[0]
        assert await seeding.reroot() == Rerooted(2, 0, 0)
        assert await seeding.reroot() == Rerooted(0, 2, 0)
        for digest in digests:
            assert digest in swarm.seeding()
            size = store.size(digest) or 0
            saved = parse_metainfo(torrents.path(digest).read_bytes(), digest, size,
                                   roots=roots.roots())
            assert saved.root_cert == roots.current
        # The fake tracker kept the old-root metainfo (a conflict): not reported.
        assert server.reports == []
        # A same-root conflict is still evidence: reported as today.
        digest = digests[0]
        with store.reading(digest) as path:
            other = make_metainfo(path, digest, store.size(digest) or 0, hybrid=True,
                                  root=new.cert_pem)
        server.metainfo[digest] = other.data
        swarm.remove(digest)
        await seeding.publish(digest, store.size(digest) or 0)
        assert server.reports == [("a", digest)]
        nursery.cancel_scope.cancel()
