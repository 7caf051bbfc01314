"""Announces the relay answers itself, because a control call already told the tracker.

libtorrent announces every torrent when it starts and when it completes. At
10,000 nodes most of those say what the tracker learns anyway:

- **Chunk torrents** (`follow`): a waiter reads its blob's chunk list as each
  chunk is filed, and the tracker enters it there as a peer of every chunk
  torrent of the blob and names the others (`ChunkList.peers`). Announced,
  they were a join and a completion per node and chunk: about 4.8 million
  for a 1 GB image in 4 MiB chunks (docs/TRACKER.md, "Chunk torrents").
  Every announce of a followed chunk torrent is answered here, from the
  peers the blob's last read brought (`learn`); its `stopped` after it was
  dropped too.
- **The node's own downloads and seeds** (`expect`): a SEEDED lease answer to a
  request that named the node's port entered it in the swarm and named its
  peers (`LeaseReply.peers`): its `started` is answered with them. The seed
  confirmation that follows a verified download names the port too, and
  enters it as a seeder: its `completed` is answered, with the seeders' long
  interval the SEEDED answer gave. A blob the node publishes is seeded first
  (the tracker hands a publisher out at once), and its `started` waits here
  for the publish (`deciding`): answered with what the publish's answer says
  (`MetainfoRecord.seeding`, the downloaders, interval and counts), or sent on
  if it did not enter the node. Each once; anything else goes to the tracker.

Owns the maps from info-hashes to what to answer, and the waits for a control
call that decides one; no I/O. It must not decide
which torrents are answered here (chunkfollow.py, peers.py and seeding.py do,
from what the tracker said).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import libtorrent as lt
import trio

from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo

# How often libtorrent asks again about a followed chunk torrent: answered here at
# no cost, and then with the peers of the latest read.
CHUNK_INTERVAL_S = 5
# The interval answered for the node's own torrents when the tracker named none:
# its default for downloaders (`announce_interval_s`).
OWN_INTERVAL_S = 60
# The `min interval` of every answer given here: a forced announce after one (a
# download asking again after its peers stalled it) goes to the tracker at once,
# which then names its own. libtorrent holds a forced announce back until the
# last answer's `min interval` has passed.
MIN_INTERVAL_S = 1
STARTED, COMPLETED, STOPPED = b"started", b"completed", b"stopped"
IPV4_ENTRY, IPV6_ENTRY = 6, 18
# Chunk torrents forgotten lately, whose `stopped` (libtorrent sends it once the
# torrent is removed) is answered here too: at most this many are remembered.
GONE_MAX = 8192
# Own torrents' announces expected, at most (the oldest go: then announced).
EXPECTED_MAX = 8192


def _key(meta: Metainfo) -> bytes:
    return meta.info_hash_v2[:20]  # as libtorrent announces a v2 torrent


def _body(interval: int, peers: list[bytes], counts: tuple[int, int] | None = None) -> bytes:
    doc: dict[bytes, Any] = {
        b"interval": interval,
        b"min interval": MIN_INTERVAL_S,
        b"peers": b"".join(p for p in peers if len(p) == IPV4_ENTRY),
    }
    if counts is not None:  # libtorrent keeps them (the swarm's eviction weighs them)
        doc[b"complete"], doc[b"incomplete"] = counts
    six = b"".join(p for p in peers if len(p) == IPV6_ENTRY)
    if six:
        doc[b"peers6"] = six
    return lt.bencode(doc)


@dataclass
class LocalAnswers:
    _blob_of: dict[bytes, Digest] = field(default_factory=dict)  # chunk info-hash -> blob
    _hash_of: dict[Digest, bytes] = field(default_factory=dict)  # chunk -> info-hash
    _peers: dict[Digest, list[bytes]] = field(default_factory=dict)  # blob -> compact
    _gone: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    # (info-hash, event) -> the interval, peers and counts to answer it with, once
    _expected: OrderedDict[
        tuple[bytes, bytes], tuple[int, list[bytes], tuple[int, int] | None]
    ] = field(default_factory=OrderedDict)
    # (info-hash, event) whose answer waits for a control call under way
    _pending: dict[tuple[bytes, bytes], trio.Event] = field(default_factory=dict)

    # -- chunk torrents -----------------------------------------------------------

    def follow(self, chunk: Metainfo, blob: Digest) -> None:
        """Answer `chunk`'s announces here, with `blob`'s peers, until `forget`."""
        info_hash = _key(chunk)
        self._blob_of[info_hash] = blob
        self._hash_of[chunk.digest] = info_hash
        self._gone.pop(info_hash, None)

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
        self._peers[blob] = list(peers)  # (`_body` keeps only whole v4 and v6 entries)

    # -- the node's own torrents ----------------------------------------------------

    def expect(
        self,
        meta: Metainfo,
        event: bytes,
        peers: list[bytes] | None = None,
        interval_s: int = 0,
        counts: tuple[int, int] | None = None,
    ) -> None:
        """Answer `meta`'s next `event` announce here (with `peers`, `interval_s` as the
        tracker named it, else OWN_INTERVAL_S, and its (seeders, downloaders) `counts`),
        once: a control call entered the node in the swarm for it."""
        interval = interval_s if interval_s > 0 else OWN_INTERVAL_S
        self._expected[(_key(meta), event)] = (interval, list(peers or []), counts)
        while len(self._expected) > EXPECTED_MAX:
            self._expected.popitem(last=False)

    def deciding(self, meta: Metainfo, event: bytes) -> None:
        """A control call under way decides how `meta`'s `event` announce is answered:
        the relay holds it until `decided` (a bounded while)."""
        self._pending.setdefault((_key(meta), event), trio.Event())

    def decided(self, meta: Metainfo, event: bytes) -> None:
        """The call is over (`expect`ed, or not: then the tracker answers it)."""
        pending = self._pending.pop((_key(meta), event), None)
        if pending is not None:
            pending.set()

    async def settled(self, info_hash: bytes, event: bytes, timeout_s: float) -> bytes | None:
        """`answer`, once a control call deciding it is over (or `timeout_s` passed)."""
        pending = self._pending.get((info_hash, event))
        if pending is not None:
            with trio.move_on_after(timeout_s):
                await pending.wait()
        return self.answer(info_hash, event)

    def unexpect(self, meta: Metainfo, *events: bytes) -> None:
        """Answer `meta`'s `events` (default: any) here no more: its download failed,
        or its start was never announced (the torrent was there already)."""
        for event in events or (STARTED, COMPLETED):
            self._expected.pop((_key(meta), event), None)

    # -- the relay ------------------------------------------------------------------

    def answer(self, info_hash: bytes, event: bytes) -> bytes | None:
        """The bencoded answer to an announce of `info_hash` with `event` (b"" for none),
        or None: the tracker answers it."""
        blob = self._blob_of.get(info_hash)
        if blob is not None:
            peers = [] if event == STOPPED else self._peers.get(blob, [])
            return _body(CHUNK_INTERVAL_S, peers)
        if event == STOPPED and info_hash in self._gone:
            return _body(CHUNK_INTERVAL_S, [])
        own = self._expected.pop((info_hash, event), None)
        return None if own is None else _body(*own)
