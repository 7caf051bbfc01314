"""Peers of chunk swarms, as the tracker hands them out with each read of a chunk list.

A blob that spreads in chunks has one torrent per chunk, and every waiter joins
each of them: announced like any torrent, that is a join and a completion per
node and chunk at the tracker, about 4.8 million announces for 10,000 nodes
pulling a 1 GB image in 4 MiB chunks (docs/TRACKER.md, "Chunk torrents"). But
a waiter already reads the blob's chunk list as each chunk is filed, and the
tracker enters it there as a peer of every chunk torrent of the blob and hands
it the others (`ChunkList.peers`). So the announce relay answers a followed
chunk torrent's announces itself (`answer`), from the peers the last read
brought, and none of them reaches the tracker. Owns the map from a chunk
torrent's info-hash to its blob and each blob's last peers; sans-IO. It must
not decide which torrents are followed this way (chunkfollow.py does: only those
whose list came from a tracker that hands out peers).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import libtorrent as lt

from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo

# How often libtorrent asks again: the relay answers at once and costs nothing
# beyond the node, and the answer then carries the peers of the latest read.
ANSWER_INTERVAL_S = 5
IPV4_ENTRY, IPV6_ENTRY = 6, 18
# Chunk torrents forgotten lately, whose `stopped` (libtorrent sends it once the
# torrent is removed) is answered here too: at most this many are remembered.
GONE_MAX = 8192


@dataclass
class ChunkPeers:
    _blob_of: dict[bytes, Digest] = field(default_factory=dict)  # info-hash (20) -> blob
    _hash_of: dict[Digest, bytes] = field(default_factory=dict)  # chunk -> info-hash (20)
    _peers: dict[Digest, list[bytes]] = field(default_factory=dict)  # blob -> compact
    _gone: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def track(self, chunk: Metainfo, blob: Digest) -> None:
        """Answer `chunk`'s announces here, with `blob`'s peers, until `forget`."""
        info_hash = chunk.info_hash_v2[:20]  # as libtorrent announces a v2 torrent
        self._blob_of[info_hash] = blob
        self._gone.pop(info_hash, None)
        self._hash_of[chunk.digest] = info_hash

    def forget(self, chunk: Digest) -> bool:
        """Stop answering for `chunk`; whether it was answered here."""
        info_hash = self._hash_of.pop(chunk, None)
        if info_hash is None:
            return False
        blob = self._blob_of.pop(info_hash)
        if blob not in self._blob_of.values():
            self._peers.pop(blob, None)
        self._gone[info_hash] = None
        while len(self._gone) > GONE_MAX:
            self._gone.popitem(last=False)
        return True

    def learn(self, blob: Digest, peers: list[bytes]) -> None:
        """The peers the tracker handed out with `blob`'s chunk list (the newest read)."""
        self._peers[blob] = [p for p in peers if len(p) in (IPV4_ENTRY, IPV6_ENTRY)]

    def answer(self, info_hash: bytes, *, stopped: bool) -> bytes | None:
        """The bencoded answer to an announce of `info_hash`, or None if it is not a
        followed chunk torrent (the tracker answers it): a forgotten one's `stopped`
        too, which the tracker never needed."""
        blob = self._blob_of.get(info_hash)
        if blob is None and not (stopped and info_hash in self._gone):
            return None
        peers = [] if blob is None or stopped else self._peers.get(blob, [])
        body: dict[bytes, Any] = {
            b"interval": ANSWER_INTERVAL_S,
            b"min interval": ANSWER_INTERVAL_S,
            b"peers": b"".join(p for p in peers if len(p) == IPV4_ENTRY),
        }
        six = b"".join(p for p in peers if len(p) == IPV6_ENTRY)
        if six:
            body[b"peers6"] = six
        return lt.bencode(body)

    def __len__(self) -> int:
        return len(self._blob_of)
