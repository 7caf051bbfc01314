"""The chunk book's records in Redis: the keys and fenced commands `RedisStore` runs for them.

Per blob, under `p2preg:`:

    k:<blob>    records: hash {h: [size, chunk_bytes, publisher, at], <i>: [digest, metainfo]}
    kd:<blob>   an open chunk dispute: [reporter, opened at, the set-aside records]
    kb:<blob>   the publishers barred from filing its chunks again (a set)
    k           the index: a sorted set of blobs scored by when their keys expire

A chunk filed writes the head and that chunk alone. Every key of a blob
written expires `KEEP_S` after (the book drops records `RECORD_TTL_S` after
their last change, and its commit deletes them; the expiry only bounds what a
killed replica left behind), and each batch drops the index's expired names.
A verdict's loser is quarantined in the `q:` keys the metainfo disputes use.
This module only builds commands and reads records: `RedisStore` applies them
under its term's fence, like every other write.
"""

from __future__ import annotations

from typing import Any

import coredis
import msgpack
from coredis.tokens import PureToken

from tracker.chunk_store import (
    ChunkWrite,
    StoredChunkBlob,
    StoredChunkDispute,
    StoredChunkRecords,
    pack_records,
    unpack_records,
)
from tracker.chunks import RECORD_TTL_S

P = "p2preg:"
INDEX = P + "k"
KEEP_S = 2 * RECORD_TTL_S
HEAD = b"h"


def commands(writes: list[ChunkWrite], now_unix: float) -> list[list[Any]]:
    batch: list[list[Any]] = [["ZREMRANGEBYSCORE", INDEX, "-inf", repr(now_unix)]]
    keep_ms = int(KEEP_S * 1000)
    for w in writes:
        k, kd, kb = P + f"k:{w.blob}", P + f"kd:{w.blob}", P + f"kb:{w.blob}"
        if w.records is None or w.restart:
            batch.append(["DEL", k])
        r = w.records
        if r is not None:
            head = msgpack.packb([r.size, r.chunk_bytes, r.publisher, r.touched_at_unix])
            batch.append(["HSET", k, HEAD, head])
            for i in range(w.start, len(r.digests)):
                batch.append(["HSET", k, str(i), msgpack.packb([r.digests[i], r.metainfo[i]])])
        if w.dispute_changed:
            batch.append(["DEL", kd])
            d = w.dispute
            if d is not None:
                batch.append(["SET", kd, msgpack.packb([d.reported_by, d.opened_at_unix,
                                                        pack_records(d.records)])])  # fmt: skip
        if w.barred_changed:
            batch.append(["DEL", kb])
            if w.barred:
                batch.append(["SADD", kb, *w.barred])
        for identity, until in w.losers:
            q = P + f"q:{identity}"
            batch += [["DEL", q], ["HSET", q, "until", repr(until), "digest", w.blob],
                      ["PEXPIRE", q, max(1, int((until - now_unix) * 1000))],
                      ["SADD", P + "q", identity]]  # fmt: skip
        if w.empty:
            batch += [["DEL", k, kd, kb], ["ZREM", INDEX, w.blob]]
        else:
            batch += [["PEXPIRE", key, keep_ms] for key in (k, kd, kb)]
            batch.append(["ZADD", INDEX, repr(now_unix + KEEP_S), w.blob])
    return batch


async def load(client: coredis.Redis[bytes], now_unix: float) -> list[StoredChunkBlob]:
    """Every blob the index names whose keys have not expired."""
    found = await client.zrange(INDEX, repr(now_unix), "+inf", sortby=PureToken.BYSCORE)
    blobs = sorted(b.decode() for b in found if isinstance(b, bytes))
    kept: list[StoredChunkBlob] = []
    for blob in blobs:
        records = _records(dict(await client.hgetall(P + f"k:{blob}")))
        raw = await client.get(P + f"kd:{blob}")
        dispute = None
        if raw is not None:
            reporter, at, packed = msgpack.unpackb(raw)
            dispute = StoredChunkDispute(unpack_records(packed), str(reporter), float(at))
        barred = tuple(sorted(b.decode() for b in await client.smembers(P + f"kb:{blob}")))
        if records is not None or dispute is not None or barred:
            kept.append(StoredChunkBlob(blob, records, dispute, barred))
    return kept


def _records(fields: dict[bytes, bytes]) -> StoredChunkRecords | None:
    head = fields.get(HEAD)
    if head is None:
        return None
    size, cut, publisher, at = msgpack.unpackb(head)
    digests: list[str] = []
    metainfo: list[bytes] = []
    # In order, up to the first one missing.
    while (raw := fields.get(str(len(digests)).encode())) is not None:
        digest, meta = msgpack.unpackb(raw)
        digests.append(str(digest))
        metainfo.append(bytes(meta))
    return StoredChunkRecords(int(size), int(cut), str(publisher), float(at), tuple(digests),
                              tuple(metainfo))  # fmt: skip
