"""The tracker's state in Redis (or Valkey): the `TrackerStore` of replicas, and their peers.

`RedisStore` keeps what `SqliteStore` keeps — metainfo, disputes, quarantines,
leases, confirmations — plus the swarms' peers, so that a standby replica
that takes over (replica.py) hands out the peers that announced to the one
before it. Layout, every key under `p2preg:` (one hash per record, a set per
kind as its index, expiring records with an expiry of their own):

    m:<digest>    metainfo {size, data, by, at}                index m
    d:<digest>    dispute {size, data, reporter, reason, by, at} index d
    q:<identity>  quarantine {until, digest}, expires then     index q
    l:<digest>    lease {id, holder, expires, done, size}, expires then  index l
    c:<digest>    confirmations: identity → v2 info-hash
    t:<name>      a tag's last answer (redis_tags.py)             index t
    p:<digest>    peers: identity → [peer id, address, claims seed, seeder, expires]
    pz:<digest>   peers by expiry (unix seconds), to drop the dead  index p
    mf:<digest>   shelved manifest {type, body, places, at}    index mf
    k:, kd:, kb:  the chunk book's records, disputes, barred (redis_chunks.py)  index k

Writes are fenced: each batch runs in one Lua script that first checks the
`p2preg:leader` key still holds the writer's term (replica.py), so a replica
that lost its term — to a failover, a partition or a pause — cannot write a
byte after its successor started. Where the server has replicas, a batch
waits (`WAIT 1`, `wait_ms`) until one has it, so a failover rarely loses a
grant; when none answers in time the write stands and is counted, since a lost
grant costs one extra upstream copy at worst, never a wrong torrent. Redis
errors become `TrackerUnavailable` (a 503 the node answers by going upstream)
and are counted and logged once per outage. This module must not decide
anything (the coordinator does) or know HTTP.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import msgpack
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import PrimaryNotFoundError, RedisError, ReplicationError
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from p2preg.core import errors
from tracker import redis_chunks, redis_tags
from tracker.chunk_store import ChunkWrite
from tracker.config import TrackerConfig
from tracker.metrics import TrackerMetrics
from tracker.state import (
    Snapshot,
    StoredConfirmation,
    StoredDispute,
    StoredLease,
    StoredManifest,
    StoredMetainfo,
    StoredQuarantine,
    StoredTag,
)
from tracker.store_url import StoreKind, StoreURL

log = logging.getLogger("p2preg.tracker")

P = "p2preg:"
LEADER_KEY = P + "leader"
# How long a batch waits for a replica of the server to have it.
DEFAULT_WAIT_MS = 100
_CONNECT_TIMEOUT_S = 2.0
_STREAM_TIMEOUT_S = 5.0
_BATCH = 500
_REPLICAS_RECHECK_S = 5.0

# A batch of commands, applied only while KEYS[1] holds ARGV[1] (the writer's
# term). A command whose first word is "?" is a guard: the batch stops there
# unless field ARGV of hash KEY equals the value given.
_FENCED_BATCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this replica no longer leads')
end
local n = 0
for _, cmd in ipairs(cmsgpack.unpack(ARGV[2])) do
  if cmd[1] == '?' then
    if redis.call('HGET', cmd[2], cmd[3]) ~= cmd[4] then return n end
  else
    redis.call(unpack(cmd))
    n = n + 1
  end
end
return n
"""

# Dead peers out of each swarm named (and the swarm when none is left), then
# each index name whose record is gone, under the same fence as _FENCED_BATCH.
_SWEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this replica no longer leads')
end
local now = ARGV[2]
local work = cmsgpack.unpack(ARGV[3])
for _, d in ipairs(work[1]) do
  local pz, p = 'p2preg:pz:' .. d, 'p2preg:p:' .. d
  local dead = redis.call('ZRANGEBYSCORE', pz, '-inf', now)
  for i = 1, #dead, 500 do
    redis.call('HDEL', p, unpack(dead, i, math.min(i + 499, #dead)))
  end
  redis.call('ZREMRANGEBYSCORE', pz, '-inf', now)
  if redis.call('ZCARD', pz) == 0 then
    redis.call('DEL', p, pz)
    redis.call('SREM', 'p2preg:p', d)
  end
end
for _, kn in ipairs(work[2]) do
  if redis.call('EXISTS', 'p2preg:' .. kn[1] .. ':' .. kn[2]) == 0 then
    redis.call('SREM', 'p2preg:' .. kn[1], kn[2])
  end
end
return 0
"""

Command = list[Any]
# What a store that does not answer raises (a timeout, a refused or reset
# connection, Sentinel naming no primary mid-failover); STORE_ERRORS adds the
# store's refusals.
UNREACHABLE: tuple[type[Exception], ...] = (
    RedisConnectionError, PrimaryNotFoundError, TimeoutError, OSError
)
STORE_ERRORS: tuple[type[Exception], ...] = (*UNREACHABLE, RedisError)


@dataclass(frozen=True, slots=True)
class StoredPeer:
    """A swarm's peer as a replica hands it over: wall-clock expiry, as leases."""

    digest: str
    identity: str
    peer_id: bytes
    compact: bytes
    claims_seed: bool
    seeder: bool
    expires_at_unix: float
    # What its last announce said, for the cluster page: when (0: unknown), and its
    # own byte counters.
    announced_at_unix: float = 0.0
    uploaded: int = 0
    downloaded: int = 0


def _hash(fields: dict[bytes, bytes], *names: str) -> list[bytes | None]:
    return [fields.get(n.encode()) for n in names]


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode()


class RedisStore:
    """A `TrackerStore` over one coredis client; writes carry the writer's term."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        metrics: TrackerMetrics,
        *,
        wait_ms: int = DEFAULT_WAIT_MS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._wait_ms = wait_ms
        self._wall = wall_clock
        self.term: bytes = b""  # set by replica.py when this replica leads
        self._down = False
        self._replicas = False
        self._replicas_checked_at = float("-inf")

    # -- reads -----------------------------------------------------------------

    async def load(self) -> Snapshot:
        async with self._calling("load"):
            return Snapshot(
                metainfo=[_metainfo(d, f) for d, f in await self._records("m")],
                leases=[_lease(d, f) for d, f in await self._records("l")],
                disputes=[_dispute(d, f) for d, f in await self._records("d")],
                quarantines=[_quarantine(i, f) for i, f in await self._records("q")],
                confirmations=await self._confirmations(),
                tags=[redis_tags.record(f) for _, f in await self._records(redis_tags.INDEX)],
                manifests=[_manifest(d, f) for d, f in await self._records("mf")],
                chunks=await redis_chunks.load(self._client, self._wall()),
            )

    async def load_peers(self) -> list[StoredPeer]:
        """Every peer whose time is not up."""
        now = self._wall()
        peers: list[StoredPeer] = []
        async with self._calling("load"):
            for digest in sorted(await self._client.smembers(P + "p")):
                d = digest.decode()
                alive = await self._by_score(P + f"pz:{d}", repr(now), "+inf")
                if not alive:
                    continue
                values = await self._client.hmget(P + f"p:{d}", alive)
                for identity, raw in zip(alive, values, strict=True):
                    if raw is not None:
                        peers.append(_peer(d, identity.decode(), raw))
        return peers

    async def _by_score(self, key: str, low: str, high: str) -> list[bytes]:
        found = await self._client.zrange(key, low, high, sortby=PureToken.BYSCORE)
        return [m for m in found if isinstance(m, bytes)]

    async def _records(self, kind: str) -> list[tuple[str, dict[bytes, bytes]]]:
        names = sorted(n.decode() for n in await self._client.smembers(P + kind))
        found: list[tuple[str, dict[bytes, bytes]]] = []
        for name in names:
            fields = await self._client.hgetall(P + f"{kind}:{name}")
            if fields:  # an expired record leaves its name in the index until a sweep
                found.append((name, dict(fields)))
        return found

    async def _confirmations(self) -> list[StoredConfirmation]:
        found = []
        for digest in sorted(n.decode() for n in await self._client.smembers(P + "m")):
            for identity, info_hash in (await self._client.hgetall(P + f"c:{digest}")).items():
                found.append(StoredConfirmation(digest, info_hash, identity.decode()))
        return found

    # -- TrackerStore writes -------------------------------------------------------

    async def put_metainfo(self, record: StoredMetainfo) -> None:
        await self._apply("put_metainfo", _put_metainfo(record))

    async def put_dispute(self, dispute: StoredDispute) -> None:
        d = dispute
        key = P + f"d:{d.digest}"
        fields = {"size": d.size, "data": d.data, "reporter": d.reported_by,
                  "reason": d.reason, "by": d.published_by, "at": d.opened_at_unix}  # fmt: skip
        batch: list[Command] = [["DEL", key], ["HSET", key, *_flat(fields)]]
        await self._apply("put_dispute", [*batch, ["SADD", P + "d", d.digest]])

    async def settle_dispute(
        self, digest: str, winner: StoredMetainfo | None, losers: list[StoredQuarantine]
    ) -> None:
        batch: list[Command] = [["DEL", P + f"d:{digest}"], ["SREM", P + "d", digest]]
        if winner is not None:
            batch += _put_metainfo(winner)
        for q in losers:
            key = P + f"q:{q.identity}"
            batch += [
                ["DEL", key],
                ["HSET", key, "until", repr(q.until_unix), "digest", q.digest],
                ["PEXPIRE", key, self._ms_left(q.until_unix)],
                ["SADD", P + "q", q.identity],
            ]
        await self._apply("settle_dispute", batch)

    async def save_lease(self, lease: StoredLease) -> None:
        key = P + f"l:{lease.digest}"
        size = -1 if lease.size is None else lease.size
        fields = {"id": lease.lease_id, "holder": lease.holder, "expires": lease.expires_at_unix,
                  "done": lease.bytes_done, "size": size}  # fmt: skip
        await self._apply(
            "save_lease",
            [
                ["DEL", key],
                ["HSET", key, *_flat(fields)],
                ["PEXPIRE", key, self._ms_left(lease.expires_at_unix)],
                ["SADD", P + "l", lease.digest],
            ],
        )

    async def delete_lease(self, digest: str, lease_id: str) -> None:
        key = P + f"l:{digest}"
        # Only that lease: a newer one on the digest stays.
        guard = ["?", key, "id", lease_id]
        await self._apply("delete_lease", [guard, ["DEL", key], ["SREM", P + "l", digest]])

    async def put_confirmation(self, confirmation: StoredConfirmation) -> None:
        c = confirmation
        batch = [["HSET", P + f"c:{c.digest}", c.identity, c.info_hash]]
        await self._apply("put_confirmation", batch)

    async def delete_metainfo(self, digest: str) -> None:
        await self._apply(
            "delete_metainfo",
            [["DEL", P + f"m:{digest}", P + f"c:{digest}"], ["SREM", P + "m", digest]],
        )

    async def put_tag(self, tag: StoredTag, dropped: list[tuple[str, str, str, str]]) -> None:
        await self._apply("put_tag", redis_tags.put_commands(tag, dropped))

    async def put_manifest(self, record: StoredManifest, dropped: list[str]) -> None:
        r, key = record, P + f"mf:{record.digest}"
        batch: list[Command] = []
        for d in dropped:  # a command each: a Lua call takes a few thousand arguments
            batch += [["DEL", P + f"mf:{d}"], ["SREM", P + "mf", d]]
        fields = {"type": r.media_type, "body": r.body, "places": "\n".join(r.places),
                  "at": r.shelved_at_unix}  # fmt: skip
        batch += [["DEL", key], ["HSET", key, *_flat(fields)], ["SADD", P + "mf", r.digest]]
        await self._apply("put_manifest", batch)

    async def put_chunks(self, writes: list[ChunkWrite]) -> None:
        await self._apply("put_chunks", redis_chunks.commands(writes, self._wall()))

    # -- peers -----------------------------------------------------------------

    async def save_peers(
        self, peers: Iterable[StoredPeer], gone: Iterable[tuple[str, str]]
    ) -> None:
        """Write peers that announced and drop those that left, in one fenced batch."""
        batch: list[Command] = []
        for p in peers:
            value = msgpack.packb([p.peer_id, p.compact, p.claims_seed, p.seeder,
                                   p.expires_at_unix, p.announced_at_unix, p.uploaded,
                                   p.downloaded])  # fmt: skip
            batch += [
                ["HSET", P + f"p:{p.digest}", p.identity, value],
                ["ZADD", P + f"pz:{p.digest}", repr(p.expires_at_unix), p.identity],
                ["SADD", P + "p", p.digest],
            ]
        for digest, identity in gone:
            batch += [
                ["HDEL", P + f"p:{digest}", identity],
                ["ZREM", P + f"pz:{digest}", identity],
            ]
        if batch:
            await self._apply("save_peers", batch)

    async def sweep(self) -> None:
        """Drop dead peers and the index names of records that expired by themselves,
        each decided and done in one script, so a write in between is never undone."""
        now = repr(self._wall())
        async with self._calling("sweep"):
            swarms = sorted(await self._client.smembers(P + "p"))
            named = [[kind, name] for kind in ("q", "l")
                     for name in sorted(await self._client.smembers(P + kind))]  # fmt: skip
        for start in range(0, max(len(swarms), len(named)), _BATCH):
            part = msgpack.packb(
                [swarms[start : start + _BATCH], named[start : start + _BATCH]],
                use_bin_type=False,
            )
            async with self._calling("sweep"):
                await self._client.eval(_SWEEP, [LEADER_KEY], [self.term, now, part])

    # -- plumbing ----------------------------------------------------------------

    def _ms_left(self, unix: float) -> int:
        """Milliseconds until `unix` on this replica's clock (at least 1): Redis keeps
        the expiry relative to its own, so replicas' clocks need not agree."""
        return max(1, int((unix - self._wall()) * 1000))

    async def _apply(self, op: str, batch: Sequence[Command]) -> None:
        # Redis's cmsgpack reads the old raw type only, not bin.
        payload = msgpack.packb([[_arg(a) for a in cmd] for cmd in batch], use_bin_type=False)
        args = [self.term, payload]
        async with self._calling(op):
            if not await self._has_replicas():
                await self._client.eval(_FENCED_BATCH, [LEADER_KEY], args)
                return
            try:
                # WAIT on the script's own connection, after it: coredis raises when
                # no replica had the batch in time (it was applied on the primary).
                with self._client.ensure_replication(1, self._wait_ms):
                    await self._client.eval(_FENCED_BATCH, [LEADER_KEY], args)
            except ReplicationError:
                self._metrics.store_unreplicated.inc()

    async def _has_replicas(self) -> bool:
        """Whether the server has a replica to wait for (asked at most every few seconds)."""
        if self._wait_ms <= 0:
            return False
        now = time.monotonic()
        if now >= self._replicas_checked_at + _REPLICAS_RECHECK_S:
            info = await self._client.info("replication")
            self._replicas = str(info.get("connected_slaves", "0")) != "0"
            self._replicas_checked_at = now
        return self._replicas

    @asynccontextmanager
    async def _calling(self, op: str) -> AsyncIterator[None]:
        try:
            yield
        except UNREACHABLE as e:
            self._metrics.store_errors.labels(op).inc()
            if not self._down:
                log.error("tracker: the store is unreachable (%s): %s", op, type(e).__name__)
            self._down = True
            raise errors.TrackerUnavailable("the tracker's store is unreachable") from None
        except RedisError as e:
            self._metrics.store_errors.labels(op).inc()
            if "FENCED" in str(e):
                raise errors.TrackerUnavailable("this tracker replica no longer leads") from None
            log.error("tracker: the store refused %s: %s", op, str(e)[:200])
            raise errors.TrackerUnavailable("the tracker's store failed") from None
        if self._down:
            log.warning("tracker: the store answers again")
            self._down = False


def _put_metainfo(r: StoredMetainfo) -> list[Command]:
    key = P + f"m:{r.digest}"
    fields = {"size": r.size, "data": r.data, "by": r.published_by, "at": r.published_at_unix}
    return [["DEL", key], ["HSET", key, *_flat(fields)], ["SADD", P + "m", r.digest]]


def _flat(fields: dict[str, object]) -> list[object]:
    return [x for kv in fields.items() for x in kv]


def _arg(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


def _manifest(digest: str, f: dict[bytes, bytes]) -> StoredManifest:
    media_type, body, places, at = _hash(f, "type", "body", "places", "at")
    return StoredManifest(digest, _text(media_type), body or b"",
                          tuple(_text(places).split("\n")), float(at or 0))  # fmt: skip


def _metainfo(digest: str, f: dict[bytes, bytes]) -> StoredMetainfo:
    size, data, by, at = _hash(f, "size", "data", "by", "at")
    return StoredMetainfo(digest, int(size or 0), data or b"", _text(by), float(at or 0))


def _dispute(digest: str, f: dict[bytes, bytes]) -> StoredDispute:
    names = ("size", "data", "reporter", "reason", "by", "at")
    size, data, reporter, reason, by, at = _hash(f, *names)
    return StoredDispute(digest, int(size or 0), data or b"", _text(reporter), _text(reason),
                         _text(by), float(at or 0))  # fmt: skip


def _quarantine(identity: str, f: dict[bytes, bytes]) -> StoredQuarantine:
    until, digest = _hash(f, "until", "digest")
    return StoredQuarantine(identity, float(until or 0), _text(digest))


def _lease(digest: str, f: dict[bytes, bytes]) -> StoredLease:
    lease_id, holder, expires, done, size = _hash(f, "id", "holder", "expires", "done", "size")
    n = int(size or -1)
    return StoredLease(digest, _text(lease_id), _text(holder), float(expires or 0),
                       int(done or 0), None if n < 0 else n)  # fmt: skip


def _peer(digest: str, identity: str, raw: bytes) -> StoredPeer:
    peer_id, compact, claims, seeder, expires, *announced = msgpack.unpackb(raw)
    return StoredPeer(digest, identity, peer_id, compact, claims, seeder, expires, *announced)


@asynccontextmanager
async def open_redis(url: StoreURL, config: TrackerConfig) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the store's server (Sentinel's current primary for redis+sentinel).

    It connects on first use: a tracker started while Redis is away stands by.
    """
    # coredis logs each retry at INFO; the outage is ours to report, once.
    logging.getLogger("coredis").setLevel(logging.WARNING)
    password = config.resolved_store_password()
    common: dict[str, Any] = {
        "username": url.username,
        "password": password,
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "stream_timeout": _STREAM_TIMEOUT_S,
        "client_name": "p2preg-tracker",
        # One try: a call the term waits on must end in time, and a retried
        # script may have run already.
        "retry_policy": NoRetryPolicy(),
    }
    if url.kind is StoreKind.SENTINEL:
        sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
            [(h.host, h.port) for h in url.hosts],
            # The password is the data servers'; sentinels are asked without one.
            sentinel_kwargs={
                "connect_timeout": _CONNECT_TIMEOUT_S,
                "stream_timeout": _STREAM_TIMEOUT_S,
            },
            **{k: v for k, v in common.items() if v is not None},
            db=url.db,
        )
        assert url.service is not None
        async with sentinel, sentinel.primary_for(url.service) as client:
            yield client
        return
    host = url.hosts[0]
    context = None
    if url.tls:
        cafile = None if config.store_ca_file is None else str(config.store_ca_file)
        context = ssl.create_default_context(cafile=cafile)
    client = coredis.Redis(host.host, host.port, url.db, ssl_context=context,
                           ssl=url.tls, **common)  # fmt: skip
    async with client:
        yield client
