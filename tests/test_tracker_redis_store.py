"""The tracker's Redis store (tracker/redis_store.py) against a real redis-server.

No tracker process: what a replica writes comes back from `load` on another
client, as SQLite's does across a reopen; a write that does not carry the term
the `p2preg:leader` key holds is refused and changes nothing (the fencing
that keeps a replica that lost its term from writing); a lease is deleted only
by its own id; dead peers are not handed to the next term; the manifest shelf
is handed over whole, bodies byte for byte, without what a commit dropped. (A
store that does not answer is tried on tracker processes,
tests/test_tracker_replicas.py.)
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from harness.redis import RedisServer, start_redis
from p2preg.core import errors
from tracker.config import TrackerConfig
from tracker.metrics import TrackerMetrics
from tracker.redis_store import DEFAULT_WAIT_MS, LEADER_KEY, RedisStore, StoredPeer, open_redis
from tracker.state import (
    StoredConfirmation,
    StoredDispute,
    StoredLease,
    StoredManifest,
    StoredMetainfo,
    StoredQuarantine,
)
from tracker.store_url import parse_store_url

pytestmark = pytest.mark.integration

PASSWORD = "store-test-password"
DIGEST = "sha256:" + "a" * 64
TERM = b"7:replica-a"


@asynccontextmanager
async def store_on(
    server: RedisServer, tmp_path: Path, *, wait_ms: int = DEFAULT_WAIT_MS
) -> AsyncIterator[RedisStore]:
    secret = tmp_path / "store-password"
    secret.write_text(PASSWORD + "\n")
    config = TrackerConfig(store=parse_store_url(server.url()), store_password_file=secret)
    async with open_redis(config.store, config) as client:  # type: ignore[arg-type]
        await client.set(LEADER_KEY, TERM)
        store = RedisStore(client, TrackerMetrics(), wait_ms=wait_ms)
        store.term = TERM
        yield store


async def test_what_one_replica_writes_the_next_loads(tmp_path: Path) -> None:
    stored = StoredMetainfo(DIGEST, 10, b"stored\x00bytes", "p", 1.5)
    dispute = StoredDispute(DIGEST, 10, b"challenger", "r", "mismatch", "p", 2.0)
    lease = StoredLease(DIGEST, "id-1", "holder", 4e9, 5, None)
    sized = StoredLease("sha256:" + "b" * 64, "id-2", "other", 4e9, 0, 99)
    confirmation = StoredConfirmation(DIGEST, b"\x01" * 32, "c")
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await store.put_metainfo(stored)
            await store.put_dispute(dispute)
            await store.save_lease(lease)
            await store.save_lease(sized)
            await store.put_confirmation(confirmation)
        async with store_on(server, tmp_path) as store:
            snapshot = await store.load()
            assert snapshot.metainfo == [stored] and snapshot.disputes == [dispute]
            assert sorted(snapshot.leases, key=lambda x: x.digest) == [lease, sized]
            assert snapshot.confirmations == [confirmation]
            winner = StoredMetainfo(DIGEST, 10, b"challenger", "r", 3.0)
            loser = StoredQuarantine("p", 4e9, DIGEST)
            await store.settle_dispute(DIGEST, winner, [loser])
            snapshot = await store.load()
            assert snapshot.disputes == [] and snapshot.metainfo == [winner]
            assert snapshot.quarantines == [loser]
            await store.delete_metainfo(DIGEST)
            snapshot = await store.load()
            assert snapshot.metainfo == [] and snapshot.confirmations == []


async def test_the_next_replica_loads_the_shelf_without_what_was_dropped(tmp_path: Path) -> None:
    body = b'{"schemaVersion": 2}\x00' + b"x" * 3 * 1024 * 1024  # a big one: bytes intact
    kept = StoredManifest(DIGEST, "application/vnd.oci.image.index.v1+json", body,
                          ("127.0.0.1:5000/a", "127.0.0.1:5000/b"), 5.5)  # fmt: skip
    other = "sha256:" + "c" * 64
    gone = StoredManifest(other, "application/json", b"{}", ("h/r",), 1.0)
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await store.put_manifest(gone, [])
            await store.put_manifest(kept, [other])
        async with store_on(server, tmp_path) as store:
            assert (await store.load()).manifests == [kept]
            assert server.cli("SMEMBERS", "p2preg:mf") == [DIGEST]
            server.cli("SET", LEADER_KEY, "8:replica-b")
            with pytest.raises(errors.TrackerUnavailable, match="no longer leads"):
                await store.put_manifest(gone, [DIGEST])
            assert (await store.load()).manifests == [kept]


async def test_a_replica_that_lost_its_term_cannot_write(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await store.put_metainfo(StoredMetainfo(DIGEST, 1, b"first", "p", 1.0))
            # Another replica took the term (the key expired, or a failover lost it).
            server.cli("SET", LEADER_KEY, "8:replica-b")
            with pytest.raises(errors.TrackerUnavailable, match="no longer leads"):
                await store.put_metainfo(StoredMetainfo(DIGEST, 1, b"second", "p", 2.0))
            with pytest.raises(errors.TrackerUnavailable):
                await store.save_lease(StoredLease(DIGEST, "id", "h", 4e9, 0, None))
            with pytest.raises(errors.TrackerUnavailable):
                await store.delete_metainfo(DIGEST)
            server.cli("SET", LEADER_KEY, TERM.decode())
            snapshot = await store.load()
            assert [m.data for m in snapshot.metainfo] == [b"first"] and snapshot.leases == []
            assert store._metrics.store_errors.labels("save_lease")._value.get() == 1


async def test_a_lease_is_deleted_only_by_its_own_id(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            newer = StoredLease(DIGEST, "newer", "b", 4e9, 0, None)
            await store.save_lease(newer)
            await store.delete_lease(DIGEST, "older")
            assert (await store.load()).leases == [newer]
            await store.delete_lease(DIGEST, "newer")
            assert (await store.load()).leases == []


async def test_live_peers_are_handed_over_and_dead_ones_swept(tmp_path: Path) -> None:
    alive = StoredPeer(DIGEST, "node-a", b"p" * 20, b"\x7f\x00\x00\x01\x1b\x59", True, True, 4e9,
                       1.7e9, 123, 456)
    dead = StoredPeer(DIGEST, "node-b", b"q" * 20, b"\x7f\x00\x00\x01\x1b\x5a", False, False, 1.0)
    left = StoredPeer(DIGEST, "node-c", b"r" * 20, b"\x7f\x00\x00\x01\x1b\x5b", False, False, 4e9)
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await store.save_peers([alive, dead, left], [])
            await store.save_peers([], [(DIGEST, "node-c")])
            assert await store.load_peers() == [alive]
            await store.sweep()
            assert server.cli("HKEYS", f"p2preg:p:{DIGEST}") == ["node-a"]
            await store.save_peers([], [(DIGEST, "node-a")])
            await store.sweep()
            assert server.cli("EXISTS", f"p2preg:p:{DIGEST}", f"p2preg:pz:{DIGEST}") == ["0"]
            assert server.cli("SCARD", "p2preg:p") == ["0"]


async def test_a_big_sweep_drops_thousands_of_dead_peers_and_keeps_live_records(
    tmp_path: Path,
) -> None:
    # More dead peers in one swarm than one Lua call can take as arguments (~8,000).
    dead = [StoredPeer(DIGEST, f"n{i}", b"p" * 20, b"\x7f\x00\x00\x01\x1b\x59", False, False,
                       1.0) for i in range(9000)]  # fmt: skip
    live = StoredPeer(DIGEST, "alive", b"q" * 20, b"\x7f\x00\x00\x01\x1b\x5a", True, True, 4e9)
    lease = StoredLease(DIGEST, "id", "holder", 4e9, 0, None)
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await store.save_peers([*dead, live], [])
            await store.save_lease(lease)
            server.cli("SADD", "p2preg:l", "sha256:" + "0" * 64)  # a record that expired
            await store.sweep()
            assert server.cli("HLEN", f"p2preg:p:{DIGEST}") == ["1"]
            assert await store.load_peers() == [live]
            assert (await store.load()).leases == [lease]
            assert server.cli("SMEMBERS", "p2preg:l") == [DIGEST]


async def test_a_write_no_replica_acknowledged_stands_and_is_counted(tmp_path: Path) -> None:
    with (
        start_redis(tmp_path / "primary", password=PASSWORD) as primary,
        start_redis(tmp_path / "replica", replica_of=primary) as replica,
    ):
        # A wait that a live replica always meets on a busy machine; a stopped one never.
        async with store_on(primary, tmp_path, wait_ms=2000) as store:
            unreplicated = store._metrics.store_unreplicated
            await store.put_metainfo(StoredMetainfo(DIGEST, 1, b"first", "p", 1.0))
            assert unreplicated._value.get() == 0
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                await store.put_metainfo(StoredMetainfo(DIGEST, 1, b"second", "p", 2.0))
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            assert unreplicated._value.get() == 1
            assert [m.data for m in (await store.load()).metainfo] == [b"second"]


def test_the_password_never_goes_in_the_url() -> None:
    from p2preg.core.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_store_url("redis://user:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(refused.value)
    url = parse_store_url("redis+sentinel://a:1,[::1],b/svc/2")
    assert (url.service, url.db, [h.port for h in url.hosts]) == ("svc", 2, [1, 26379, 26379])
    assert str(parse_store_url("rediss://ops@r.example/3")) == "rediss://ops@r.example:6379/3"
    for bad in ("http://x", "redis://a,b/0", "redis://h/x", "redis://h/0?ssl=1", "redis:///0"):
        with pytest.raises(ConfigError):
            parse_store_url(bad)
    # A password slipped into a query is refused and not echoed, wherever it sits.
    for leaky in ("redis://h?password=hunter2", "redis://h:6379?password=hunter2"):
        with pytest.raises(ConfigError) as refused:
            parse_store_url(leaky)
        assert "hunter2" not in str(refused.value)
