"""The cluster simulation (bench/simulate/): the invariants its numbers rest on.

Small clusters (tens of nodes, tens of MB) so the whole file runs in seconds;
each test runs the real simulator, which drives the tracker's real lease book,
upstream queue, peer table and hand-out, and the node's real lease wait; the
tracker as a server (bench/simulate/server.py) queues every request.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import replace

import pytest

from bench.simulate.cluster import Cluster, chunk_sizes, simulate
from bench.simulate.engine import Engine, Node
from bench.simulate.params import MB, MiB, Params
from bench.simulate.result import Result
from bench.simulate.server import Queue
from bench.simulate.swarm import Swarms
from p2preg.node.config import NodeConfig

SMALL = Params(
    nodes=24, image_bytes=60 * MB, layers=3, upstream_mbit=100.0, node_mbit=1000.0,
    fail_fraction=0.0, holder_failures=0,
)
# 60 nodes asking for 10 layers at once: 600 mTLS handshakes queue at the serving
# replica (1.5 s at 2.5 ms), past the 0.5 s a grant has to be acknowledged.
BURST = Params(
    nodes=60, image_bytes=100 * MB, layers=10, upstream_mbit=1000.0, node_mbit=10_000.0,
    fail_fraction=0.0, holder_failures=0, client_downloads=0,
)


def test_chunks_are_whole_pieces_of_at_least_4_mib_and_add_up() -> None:
    for size in (1, 5 * MiB, 25_008_141, 100 * MB, 1 << 31):
        sizes = chunk_sizes(size, 4 * MiB)
        assert sum(sizes) == size
        assert all(s >= 4 * MiB for s in sizes[:-1])


def test_bytes_delivered_are_what_the_nodes_needed() -> None:
    c = Cluster(SMALL)
    r = c.run()
    assert r.unfinished == 0 and len(r.completion_s) == SMALL.nodes
    from_upstream = sum(c.upstream_bytes)
    assert r.peer_bytes + from_upstream == SMALL.nodes * SMALL.image_bytes
    assert all(n.have == c.swarms.full for n in c.nodes)


def test_without_failures_each_layer_crosses_upstream_once() -> None:
    r = simulate(SMALL)
    assert r.upstream_layer_copies == [1.0] * SMALL.layers
    assert r.leases_granted == SMALL.layers
    assert r.fallbacks == {} and r.leases_expired == 0


@pytest.mark.parametrize("policy", ["real", "random"])
def test_no_node_completes_before_the_links_allow(policy: str) -> None:
    p = Params(
        nodes=40, image_bytes=80 * MB, layers=4, upstream_mbit=200.0, node_mbit=400.0,
        fail_fraction=0.0, policy=policy,
    )
    r = simulate(p)
    # The image crosses U once, and every node takes all of it in over its link.
    floor = max(p.image_bytes / p.upstream_bytes_s, p.image_bytes / p.node_bytes_s)
    assert r.completion_s[0] >= floor
    assert len(r.completion_s) == p.nodes
    # With one stream on U and pipelining by layers, the p99 stays near the bound.
    assert r.stats["p99_x"] < 1.5


def test_a_seed_gives_the_same_run_and_another_seed_another() -> None:
    p = Params(
        nodes=30, image_bytes=60 * MB, layers=3, upstream_mbit=100.0, node_mbit=1000.0,
        fail_fraction=0.1,
    )

    def outcome(params: Params) -> dict[str, object]:
        out = simulate(params).as_json()
        del out["wall_s"]
        return out

    assert outcome(p) == outcome(p)
    other = Params(**{**p.__dict__, "seed": 2})
    assert outcome(other)["completion_s"] != outcome(p)["completion_s"]


def _dead_holder_run(**kw: float) -> tuple[Cluster, Result]:
    p = Params(
        nodes=30, image_bytes=60 * MB, layers=3, upstream_mbit=100.0, node_mbit=1000.0,
        fail_fraction=0.1, holder_failures=1, **kw,  # type: ignore[arg-type]
    )
    c = Cluster(p)
    r = c.run()
    assert r.killed == p.failing() == 3
    # One more lease was granted than there are layers: the dead holder's.
    assert r.leases_granted == p.layers + 1
    # Its layer crossed upstream once whole, plus the dead holder's half.
    dead_layer = max(range(p.layers), key=lambda i: r.upstream_layer_copies[i])
    assert 1.4 < r.upstream_layer_copies[dead_layer] < 1.6
    others = sum(r.upstream_layer_copies) - r.upstream_layer_copies[dead_layer]
    assert others == pytest.approx(p.layers - 1)
    assert r.unfinished == 0 and len(r.completion_s) == p.nodes - r.killed
    assert all(n.finished_at is None for n in c.nodes if not n.alive)
    return c, r


def test_a_dead_holder_goes_silent_and_the_fetch_passes_to_another_node_long_before_its_ttl(
) -> None:
    c, r = _dead_holder_run()
    p = c.p
    # Taken over in the real LeaseBook by the next asker, not expired.
    assert (r.leases_replaced, r.leases_expired) == (1, 0)
    # Every survivor finished within the silence (and its detection) past the
    # same run with the silence rule off minus its TTL.
    _, slow = _dead_holder_run(lease_silence_s=0.0)
    assert (slow.leases_replaced, slow.leases_expired) == (0, 1)
    assert r.completion_s[-1] < slow.completion_s[-1] - p.lease_ttl_s + 2 * p.lease_silence_s
    assert slow.completion_s[-1] < slow.bound_s + p.lease_ttl_s + 10


def test_the_models_node_waits_as_the_nodes_defaults_say() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    assert Params(nodes=2).stall_report_s == defaults["peer_stall_report_s"]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="4 MiB"):
        Params(nodes=10, chunk_bytes=MiB)
    with pytest.raises(ValueError, match="policy"):
        Params(nodes=10, policy="fastest")
    with pytest.raises(ValueError, match="2 nodes"):
        Params(nodes=1)
    with pytest.raises(ValueError, match="client_downloads"):
        Params(nodes=10, client_downloads=-1)
    with pytest.raises(ValueError, match="confirms"):
        Params(nodes=10, confirms="never")


def test_a_replica_serves_first_come_first_served_and_counts_its_waits() -> None:
    q = Queue()
    assert q.serve(0.0, 1.0) == 1.0
    assert q.serve(0.5, 1.0) == 2.0  # waited 0.5 s behind the first
    assert q.serve(0.5, 1.0) == 3.0  # 1.5 s behind both
    assert q.serve(5.0, 1.0) == 6.0  # an idle replica: no wait
    assert q.waits == [0.0, 0.5, 1.5, 0.0]
    assert q.saturated_s == 1.5 and q.busy_s == 4.0  # waiting from 0.5 s to 2 s


def test_the_tracker_queues_the_pulls_burst_and_an_ack_waiting_in_its_queue_is_not_late() -> None:
    instant = simulate(replace(BURST, tracker_replicas=0))
    queued = simulate(BURST)
    assert instant.tracker_queue == {} and instant.lost_acks == 0
    q = queued.tracker_queue
    # Each node opened a connection per layer it asked for at once: a handshake each.
    assert q["handshakes"] >= BURST.nodes * BURST.layers
    assert q["wait_max_s"] > BURST.lease_grant_ack_s and q["saturated_s"] > 0
    # Every request that reached the tracker went through its queue, and so did each
    # held lease request the tracker woke (its answer, or its return to waiting).
    counted = queued.announces + queued.lease_asks + queued.renewals + queued.releases
    assert queued.long_poll_wakeups > 0
    assert q["requests"] >= counted + queued.publishes + queued.long_poll_wakeups
    # The acknowledgements waited in the queue longer than the ack window: the
    # tracker's lag (that queue) is added to it, so no grant was passed on.
    assert queued.lost_acks == 0 and queued.leases_replaced == 0
    assert queued.upstream_layer_copies == [1.0] * BURST.layers
    assert queued.stats["p99_s"] > instant.stats["p99_s"]


def test_a_replicas_lag_is_its_longest_recent_wait_or_its_backlog() -> None:
    q = Queue()
    assert q.lag(0.0, 1.0) == 0.0
    q.serve(0.0, 2.0)
    q.serve(0.0, 1.0)  # waits 2 s
    assert q.lag(0.5, 1.0) == 2.5  # a request arriving now waits 2.5 s
    assert q.lag(3.0, 1.0) == 2.0  # the 2 s wait, served at 2 s, within the hold
    assert q.lag(3.5, 1.0) == 0.0  # held no longer, and nothing queued


def test_a_saturated_tracker_takes_no_live_holder_over() -> None:
    # 300 nodes asking at once over mTLS: the serving replica runs seconds behind
    # whenever a layer's torrent is published and every node announces, longer
    # than a short silence. Before the lag was added to the windows, a holder
    # fetching and renewing on time was taken over and a second copy crossed.
    p = Params(
        nodes=300, image_bytes=200 * MB, layers=10, upstream_mbit=50.0, node_mbit=1000.0,
        fail_fraction=0.0, holder_failures=0, lease_silence_s=0.8, client_downloads=0,
    )
    r = simulate(p)
    assert r.tracker_queue["wait_max_s"] > p.lease_silence_s  # saturated
    assert r.unfinished == 0 and r.upstream_layer_copies == [1.0] * p.layers
    assert r.leases_replaced == 0 and r.lost_acks == 0


def test_relayed_announces_over_kept_connections_make_no_handshake() -> None:
    r = simulate(replace(BURST, announces="relayed"))
    assert r.tracker_queue["handshakes"] == 0
    assert r.unfinished == 0 and r.upstream_layer_copies == [1.0] * BURST.layers


def test_kubelets_client_asks_for_three_layers_at_a_time_in_order_and_all_arrive() -> None:
    # containerd's CRI plugin fetches max_concurrent_downloads (3) layers at once;
    # `ctr images pull` (client_downloads 0) asks for every layer at once.
    started = {}
    for k in (3, 0):
        cluster = Cluster(replace(BURST, client_downloads=k, max_sim_s=0.001))
        cluster.run()  # stopped before any layer can be in
        started[k] = sorted({layer for _, layer in cluster.waits})
        assert len(cluster.waits) == BURST.nodes * len(started[k])
    assert started == {3: [0, 1, 2], 0: list(range(BURST.layers))}
    r = simulate(replace(BURST, client_downloads=3))
    assert r.unfinished == 0 and r.upstream_layer_copies == [1.0] * BURST.layers
    # Fewer requests at once than every layer at once: the first burst is a third.
    every = simulate(BURST)
    assert r.tracker_queue["handshakes"] < every.tracker_queue["handshakes"]


def test_seed_confirmations_ride_the_next_lease_request_and_the_rest_go_alone() -> None:
    # Kubelet's three at a time: a node's confirmation of a layer goes with its
    # request for the next, so the serving replica handles fewer requests; the last
    # layers' have no request to ride and go after the hold, as every `ctr images
    # pull` node's do (it asked for every layer at once): in one call with the
    # node's other confirmations then waiting.
    base = replace(BURST, announces="entered", client_downloads=3)
    calls, riding = simulate(base), simulate(replace(base, confirms="riding"))
    assert riding.unfinished == 0 and riding.upstream_layer_copies == [1.0] * BURST.layers
    assert calls.riding_confirms == 0 and 0 < riding.riding_confirms <= riding.confirms
    # (a run ends with its last node: confirmations still held then are not counted)
    assert riding.tracker_queue["requests"] < calls.tracker_queue["requests"]
    at_once = simulate(replace(base, confirms="riding", client_downloads=0))
    assert at_once.unfinished == 0 and at_once.riding_confirms < riding.riding_confirms
    # No lease request after the first instant: what rode, rode another confirmation.
    assert 0 < at_once.riding_confirms < at_once.confirms


def test_a_download_alone_asks_for_other_peers_instead_of_waiting_for_its_announce() -> None:
    # Connections full at the first seeders (30 here, 400 in a node): the peers a
    # SEEDED answer named turn a node away, and before `lonely` it waited for its
    # periodic announce, 60 s on.
    tight = Params(
        nodes=200, image_bytes=100 * MB, layers=2, upstream_mbit=1000.0, node_mbit=10_000.0,
        fail_fraction=0.0, holder_failures=0, connections_limit=30, announces="entered",
    )
    asks, waits = simulate(tight), simulate(replace(tight, stall_report_s=0.0))
    assert asks.unfinished == waits.unfinished == 0
    assert asks.lonely_announces > 0 and waits.lonely_announces == 0
    assert waits.stats["max_s"] > tight.announce_interval_s
    assert asks.stats["max_s"] < waits.stats["max_s"] - tight.announce_interval_s / 2
    assert asks.upstream_copies == waits.upstream_copies == 1.0


def _seeder_dies_as_it_publishes(p: Params) -> tuple[Cluster, Result, list[tuple[int, bool]]]:
    """A run where layer 0's holder dies the moment the tracker lists it as the seeder,
    before any node has a chunk of it: every waiter is handed a dead peer. Also, for each
    upstream fetch of layer 0, its node and whether that node was still in the swarm."""
    c = Cluster(p)
    announce, layer0 = c.tracker.announce, c.digests[0]
    fetch, fetches = c._fetch, []

    def fetch_noted(node: Node, layer: int, lease_id: str | None, renew_s: float) -> None:
        if layer == 0:
            fetches.append((node.id, node.joined[0]))
        fetch(node, layer, lease_id, renew_s)

    def announce_then_die(node: int, digest: str, seeder: bool, *, entered: bool = False,
                          ) -> list[int]:  # fmt: skip
        peers = announce(node, digest, seeder, entered=entered)
        if digest == layer0 and seeder and c.killed == 0:
            c._kill(c.nodes[node])
        return peers

    c.tracker.announce = announce_then_die  # type: ignore[method-assign]
    c._fetch = fetch_noted  # type: ignore[method-assign]
    return c, c.run(), fetches


def test_a_seeder_that_died_unseen_is_reported_and_the_layer_fetched_again() -> None:
    p = replace(SMALL, nodes=30, layers=2, announces="entered", max_sim_s=600.0)
    c, r, fetches = _seeder_dies_as_it_publishes(p)
    assert r.killed == 1 and r.unfinished == 0
    assert all(n.finished_at is not None for n in c.nodes if n.alive)
    # The waiters reported the dead seeder; two reporters delist it (tracker/admission.py),
    # the lease goes to one of them, and the layer crosses upstream once more.
    assert r.stalled > 0 and r.delisted == 1
    assert r.upstream_layer_copies == [2.0, 1.0]
    assert r.fallbacks == {}
    # The second fetch is a stalled download's: it left the swarm first (fetch.py).
    assert len(fetches) == 2 and fetches[1][1] is False
    assert not c.nodes[fetches[1][0]].joined[0]
    # Without the stall watch the waiters sit in a swarm with nobody to serve them.
    _, stuck, _ = _seeder_dies_as_it_publishes(replace(p, stall_report_s=0.0))
    assert stuck.unfinished == p.nodes - 1 and stuck.stalled == 0


def test_a_full_peer_makes_room_only_for_a_layer_less_crowded_than_its_most_crowded() -> None:
    # libtorrent's rule at a full end (peer_connection.cpp): close a connection of the
    # torrent with the most peers if it has more than the new one's, else refuse.
    nodes = [Node(i, 2) for i in range(6)]
    swarms = Swarms(
        Engine(1e9, 1e8), nodes, [[4 * MiB] * 2, [4 * MiB] * 2], upload_slots=2,
        download_slots=2, connections_limit=3, picker="rarest", rng=random.Random(1),
        on_layer=lambda node, layer: None,
    )
    full = nodes[0]
    assert all(swarms.connect(other, full, 0) for other in nodes[1:4])
    assert full.conns == 3 and full.open == [3, 0]
    assert not swarms.connect(nodes[4], full, 0)  # its most crowded layer: refused
    assert swarms.refused == 1 and full.open == [3, 0]
    assert swarms.connect(nodes[4], full, 1)  # a newer layer: one of layer 0's goes
    assert full.conns == 3 and full.open == [2, 1] and swarms.displaced == 1
    # Counted with the new one, layer 1 would have as many as layer 0: refused.
    assert not swarms.connect(nodes[5], full, 1) and full.open == [2, 1]
    dropped = [n for n in nodes[1:4] if n.conns == 0]
    assert len(dropped) == 1 and not dropped[0].links and full.id not in dropped[0].nbrs[0]
    assert dropped[0].id not in full.nbrs[0] and len(full.links) == 3
    assert not swarms.connect(full, nodes[5], 1)  # a full node dials nobody
    assert swarms.refused == 3


def test_control_fronts_take_the_nodes_side_and_leave_the_rules_core_its_decisions() -> None:
    p = replace(BURST, announces="entered", confirms="riding")
    served = simulate(p)
    fronted = simulate(replace(p, control_fronts=2))
    assert fronted.unfinished == 0 and fronted.upstream_layer_copies == [1.0] * p.layers
    s, f = served.tracker_queue, fronted.tracker_queue
    # The same requests reach the rules core, each for a decision's cost (0.04 ms)
    # instead of a whole call's (0.28-0.32 ms; one sent back to wait costs 0.045 ms
    # either way); the node's side waits at a front.
    assert f["busy_share"] < s["busy_share"] / 2
    assert f["front_wait_max_s"] > 0 and s["front_wait_max_s"] == 0
    assert fronted.stats["p99_s"] < served.stats["p99_s"]
    with pytest.raises(ValueError, match="control_fronts"):
        Params(nodes=10, control_fronts=1)  # announces direct: no kept connection
