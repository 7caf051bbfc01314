"""Hand-out policy (tracker/handout.py) and the peer table it draws from (tracker/peers.py)."""

from __future__ import annotations

import random

import pytest

from p2preg.core.errors import InvalidRequest, LimitReached
from tracker.handout import hand_out
from tracker.peers import PeerTable, compact_address


def test_seeders_come_first_then_leechers() -> None:
    seeders = [f"s{i}" for i in range(3)]
    leechers = [f"l{i}" for i in range(10)]
    got = hand_out(seeders, leechers, 6, asker="l0", rng=random.Random(1))
    assert len(got) == 6
    assert set(got[:3]) == set(seeders)
    assert all(p.startswith("l") for p in got[3:])
    assert "l0" not in got


def test_many_seeders_fill_numwant_and_are_shuffled() -> None:
    seeders = [f"s{i}" for i in range(100)]
    orders = {tuple(hand_out(seeders, ["l"], 10, rng=random.Random(n))) for n in range(20)}
    assert all(len(o) == 10 and all(p.startswith("s") for p in o) for o in orders)
    assert len(orders) > 1  # random, not always the same ten


def test_within_a_group_the_order_is_shuffled() -> None:
    seeders = ["a", "b", "c", "d"]
    firsts = {hand_out(seeders, [], 4, rng=random.Random(n))[0] for n in range(40)}
    assert firsts == set(seeders)


def test_a_seeder_gets_downloaders_only_and_numwant_zero_gets_nobody() -> None:
    assert hand_out(["s", "t"], ["l"], 50, asker="s", asker_is_seeder=True) == ["l"]
    assert hand_out(["s", "t"], [], 50, asker="s", asker_is_seeder=True) == []
    assert hand_out(["s"], ["l"], 0, asker="l") == []


def test_asker_is_never_handed_itself() -> None:
    for n in range(30):
        got = hand_out([], ["me", "x", "y"], 2, asker="me", rng=random.Random(n))
        assert sorted(got) == ["x", "y"]


def test_compact_addresses() -> None:
    assert compact_address("127.0.0.1", 6881) == bytes([127, 0, 0, 1, 0x1A, 0xE1])
    assert compact_address("::ffff:10.0.0.2", 1) == bytes([10, 0, 0, 2, 0, 1])
    assert compact_address("::1", 2) == bytes(15) + b"\x01\x00\x02"
    with pytest.raises(InvalidRequest):
        compact_address("not-an-ip", 1)


def _up(
    table: PeerTable, key: str, who: str, pid: bytes, addr: bytes, *, seeder: bool, at: float
) -> tuple[object, object, bool]:
    return table.update(
        key, who, pid, addr, seeder=seeder, claims_seed=seeder, expires_at=at
    )


def test_peer_table_keeps_one_peer_per_identity() -> None:
    table = PeerTable(max_peers_per_swarm=10, max_peers=100)
    a = compact_address("10.0.0.1", 1000)
    b = compact_address("10.0.0.2", 1000)
    _up(table, "d", "node-a", b"p" * 20, a, seeder=False, at=10)
    # Same peer id and port from another identity: another peer, not a takeover.
    _up(table, "d", "node-b", b"p" * 20, b, seeder=True, at=10)
    swarm = table.swarm("d")
    assert swarm is not None and len(swarm.leechers) == 1 and len(swarm.seeders) == 1
    # The first identity finishes: it moves to the seeders, still one entry.
    *_, replaced = _up(table, "d", "node-a", b"p" * 20, a, seeder=True, at=20)
    assert not replaced
    assert (len(swarm.seeders), len(swarm.leechers), table.totals().peers) == (2, 0, 2)
    # Stopping as the other identity leaves the first one alone.
    table.remove("d", "node-b", b"p" * 20)
    assert [p.compact for p in swarm.seeders] == [a]
    # 1,000 peer ids and ports of one identity: one entry, the last one announced.
    for i in range(1000):
        *_, replaced = _up(
            table, "d", "node-a", bytes([i % 256]) * 20, compact_address("10.0.0.1", 2000 + i),
            seeder=True, at=30,
        )
        assert replaced
    assert table.totals().peers == 1
    assert swarm.seeder_addrs == [compact_address("10.0.0.1", 2999)]
    assert table.holder_of("d", compact_address("10.0.0.1", 2999)) == "node-a"
    assert table.holder_of("d", a) is None
    # A late `stopped` of a replaced session does not remove its successor.
    table.remove("d", "node-a", bytes([0]) * 20)
    assert table.totals().peers == 1
    table.remove("d", "node-a", bytes([999 % 256]) * 20)
    assert table.swarm("d") is None


def test_peer_table_promotes_only_a_peer_that_claims_to_seed() -> None:
    table = PeerTable(max_peers_per_swarm=10, max_peers=100)
    a, b = compact_address("10.0.0.1", 1), compact_address("10.0.0.2", 1)
    table.update("d", "a", b"a" * 20, a, seeder=False, claims_seed=True, expires_at=9)
    table.update("d", "b", b"b" * 20, b, seeder=False, claims_seed=False, expires_at=9)
    assert table.seeders("d") == 0
    assert table.promote("d", "a") and not table.promote("d", "a")
    assert not table.promote("d", "b") and not table.promote("d", "nobody")
    swarm = table.swarm("d")
    assert swarm is not None and swarm.seeder_addrs == [a] and swarm.leecher_addrs == [b]


def test_peer_table_expiry_and_limits() -> None:
    table = PeerTable(max_peers_per_swarm=2, max_peers=3)
    for i in range(2):
        _up(table, "d1", f"n{i}", bytes([i]) * 20, compact_address("10.0.0.1", 100 + i),
            seeder=False, at=5 + i)
    with pytest.raises(LimitReached):
        _up(table, "d1", "z", b"z" * 20, compact_address("10.0.0.1", 200), seeder=False, at=9)
    _up(table, "d2", "y", b"y" * 20, compact_address("10.0.0.1", 300), seeder=True, at=9)
    with pytest.raises(LimitReached):
        _up(table, "d3", "x", b"x" * 20, compact_address("10.0.0.1", 400), seeder=True, at=9)
    assert table.swarm("d3") is None
    assert table.expire_swarm("d1", now=5.5) == 1
    assert table.totals().peers == 2
    assert table.expire_swarm("d1", now=7) == 1
    assert table.swarm("d1") is None
    assert table.seeders("d2") == 1 and table.totals().swarms == 1


def test_expiry_skips_a_swarm_until_a_peer_may_be_due_and_misses_none() -> None:
    table = PeerTable(max_peers_per_swarm=10, max_peers=10)
    addr = [compact_address("10.0.0.1", 100 + i) for i in range(3)]
    _up(table, "d", "a", b"a" * 20, addr[0], seeder=False, at=10)
    _up(table, "d", "b", b"b" * 20, addr[1], seeder=False, at=20)
    _up(table, "d", "a", b"a" * 20, addr[0], seeder=False, at=30)  # refreshed: due later
    swarm = table.swarm("d")
    assert swarm is not None and swarm.earliest == 10  # a lower bound: a's old expiry
    assert table.expire_swarm("d", now=9) == 0 and swarm.earliest == 10  # not looked at
    assert table.expire_swarm("d", now=15) == 0  # a was refreshed; the bound moves to b's 20
    assert swarm.earliest == 20
    _up(table, "d", "c", b"c" * 20, addr[2], seeder=True, at=12)  # due sooner than the bound
    assert table.expire_swarm("d", now=12) == 1 and table.peer("d", "c") is None
    _up(table, "d", "b", b"b" * 20, addr[1], seeder=False, at=13)  # shortened: still caught
    assert table.expire_swarm("d", now=13) == 1 and table.peer("d", "b") is None
    assert table.expire_swarm("d", now=30) == 1 and table.swarm("d") is None


def test_swarm_groups_stay_consistent_under_churn() -> None:
    rng = random.Random(7)
    table = PeerTable(max_peers_per_swarm=1000, max_peers=1000)
    live: set[str] = set()
    for step in range(2000):
        who = f"n{rng.randrange(40)}"
        pid = bytes([rng.randrange(3)]) * 20
        addr = compact_address("10.0.0.1", 1000 + rng.randrange(3))
        if rng.random() < 0.3:
            table.remove("d", who)
            live.discard(who)
        else:
            _up(table, "d", who, pid, addr, seeder=rng.random() < 0.5, at=step)
            live.add(who)
        swarm = table.swarm("d")
        if swarm is None:
            assert not live
            continue
        for group, addrs in (
            (swarm.seeders, swarm.seeder_addrs),
            (swarm.leechers, swarm.leecher_addrs),
        ):
            assert [p.compact for p in group] == addrs
            assert all(group[p.pos] is p for p in group)
        assert len(swarm.by_key) == len(live) == table.totals().peers
