"""Tests of harness/redis.py against Debian's real redis-server and redis-sentinel.

They show that the harness starts a Redis that coredis on trio reaches, with
the password it was given and only with it; that a replica it starts holds the
primary's data; and that the Sentinels it starts promote that replica when the
primary is killed (-9), after which a coredis Sentinel client finds and writes
to the new primary: the set-up the tracker's store tests stand on.
"""

from __future__ import annotations

from pathlib import Path

import coredis
import pytest
from coredis.connection import TCPLocation
from coredis.exceptions import AuthenticationError

from harness.procs import WaitTimeout
from harness.redis import start_redis, start_sentinels, wait_for_failover

PASSWORD = "harness-test-password"

pytestmark = pytest.mark.integration


def test_redis_password_stays_in_a_private_file(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        assert server.url(3) == f"redis://127.0.0.1:{server.port}/3"
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o077 == 0
        assert PASSWORD.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert PASSWORD not in repr(server)


async def test_redis_answers_coredis_on_trio_with_its_password(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with coredis.Redis(server.host, server.port, password=PASSWORD) as client:
            assert await client.ping() == b"PONG"
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
        # coredis on trio raises from inside its pool's nursery: an exception group.
        with pytest.RaisesGroup(AuthenticationError, flatten_subgroups=True):
            async with coredis.Redis(server.host, server.port, password="wrong") as client:
                await client.ping()
    assert server.process.returncode is not None


async def test_replica_holds_the_primarys_writes(tmp_path: Path) -> None:
    with (
        start_redis(tmp_path / "primary", password=PASSWORD) as primary,
        start_redis(tmp_path / "replica", replica_of=primary) as replica,
    ):
        assert (primary.role(), replica.role()) == ("master", "slave")
        async with coredis.Redis(primary.host, primary.port, password=PASSWORD) as client:
            # WAIT 1 after the write: it has reached the replica before we read it there.
            with client.ensure_replication(1, timeout_ms=5000):
                await client.set("layer", "sha256:abc")
        assert replica.cli("GET", "layer") == ["sha256:abc"]


async def test_persisted_redis_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", persist=True)
    try:
        server.cli("SET", "kept", "yes")
        port = server.port
        server = server.restart()
        assert server.port == port
        assert server.cli("GET", "kept") == ["yes"]
    finally:
        server.stop()


async def test_sentinels_promote_the_replica_when_the_primary_is_killed(tmp_path: Path) -> None:
    with (
        start_redis(tmp_path / "primary", password=PASSWORD) as primary,
        start_redis(tmp_path / "replica", replica_of=primary) as replica,
        start_sentinels(tmp_path / "sentinels", primary, count=3, service="p2preg") as sentinels,
    ):
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        assert sentinels.url(2) == f"redis+sentinel://{hosts}/p2preg/2"
        assert {s.primary_address("p2preg") for s in sentinels} == {primary.address}
        # No failover while the primary lives: the bounded wait runs out.
        with pytest.raises(WaitTimeout, match="sentinels said"):
            wait_for_failover(sentinels, primary, timeout_s=1.5)

        primary.kill()
        assert not primary.running
        assert wait_for_failover(sentinels, primary, timeout_s=60.0) == replica.address
        assert replica.role() == "master"

        locations = [TCPLocation(h, p) for h, p in sentinels.addresses]
        async with coredis.Sentinel(locations, password=PASSWORD) as sentinel:
            assert await sentinel.discover_primary("p2preg") == replica.address
            client = sentinel.primary_for("p2preg")
            async with client:
                assert await client.set("after-failover", "written")
        assert replica.cli("GET", "after-failover") == ["written"]
