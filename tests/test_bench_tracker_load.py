"""bench/tracker's load is a cluster of identities, as the real tracker sees it.

The tracker keeps one peer per identity per swarm, so a benchmark load from one
identity measures replacements and empty answers. This drives a real tracker
process with bench/tracker_load.py's cluster (published and confirmed as the
benchmark does) over both of its generators' wire formats — the BEP 15 walk
with `node=` in URL data, and HTTP announces with `node=` — and reads what
the tracker holds: every member is its own peer, confirmed seeders count as
seeders, nothing was replaced, a leecher's answer carries the whole rest of
its swarm and a seeder's the leechers; and the lease rows' ask (`ask_seeded`)
is answered SEEDED with the swarm and enters its node as a downloader.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import trio

from bench import tracker_udp
from bench.keptalive import KeptAlive
from bench.tracker_load import (
    Cluster,
    ask_seeded,
    check_answer,
    confirm_seeders,
    make_torrents,
    node_name,
    publish_all,
)
from harness.procs import free_port
from harness.tracker import open_tracker
from tracker.client import TrackerClient

pytestmark = pytest.mark.integration

TOKEN = "test-token"
CLUSTER = Cluster(nodes=20, swarms=3, per_swarm=8, leechers=2)


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = ("peers", "seeders", "peers_replaced_total", "unconfirmed_seeds_total")
    out = {}
    for name in wanted:
        found = re.search(rf"^p2preg_tracker_{name} ([\d.e+]+)$", text, re.M)
        assert found is not None, name
        out[name] = float(found.group(1))
    return out


async def _setup(url: str, workdir: Path) -> tuple[list[bytes], list[str]]:
    metas = make_torrents(workdir, CLUSTER.swarms)
    async with httpx.AsyncClient(timeout=30) as http:
        await publish_all(TrackerClient(url, node="bench", token=TOKEN, http=http), metas)
        clients = {
            i: TrackerClient(url, node=node_name(i), token=TOKEN, http=http)
            for i in range(CLUSTER.nodes)
        }
        await confirm_seeders(clients, CLUSTER, metas)
    return [m.swarm_keys[0] for m in metas], [str(m.digest) for m in metas]


def test_every_member_is_a_peer_and_answers_carry_the_swarm(tmp_path: Path) -> None:
    port = free_port(udp=True)
    with open_tracker(tmp_path / "t", port=port, token=TOKEN) as t:
        hashes, digests = trio.run(_setup, t.url, tmp_path)
        members = tracker_udp.packets(CLUSTER, hashes, TOKEN)
        for _ in range(2):  # the second walk re-announces: nothing new, nothing replaced
            run = tracker_udp.load(port, members, 30.0, 8, walk=True)
            assert (run.answered, run.errors) == (CLUSTER.members, 0)
            got = _gauges(t.url)
            assert got["peers"] == CLUSTER.members
            assert got["seeders"] == CLUSTER.swarms * (CLUSTER.per_swarm - CLUSTER.leechers)
            assert got["peers_replaced_total"] == 0
            assert got["unconfirmed_seeds_total"] == 0
        # Over HTTP with node=: the same identities (no new peer, no replacement).
        leecher, seeder = check_answer(t.url, CLUSTER, hashes[0], token=TOKEN)
        assert leecher == CLUSTER.per_swarm - 1
        assert seeder == CLUSTER.leechers
        assert _gauges(t.url)["peers"] == CLUSTER.members
        assert _gauges(t.url)["peers_replaced_total"] == 0
        # The lease rows: a node outside swarm 0 asks for its blob, is answered
        # SEEDED with the swarm's peers and entered as one more downloader.
        outsider = CLUSTER.nodes - 1
        assert all(CLUSTER.node(0, j) != outsider for j in range(CLUSTER.per_swarm))
        c = KeptAlive(t.url, None, 10, headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            assert ask_seeded(c, digests[0], outsider) == (1, 0, CLUSTER.per_swarm)
        finally:
            c.close()
        got = _gauges(t.url)
        assert got["peers"] == CLUSTER.members + 1
        assert got["seeders"] == CLUSTER.swarms * (CLUSTER.per_swarm - CLUSTER.leechers)
