"""What one simulated pull measured, as a plain dataclass that goes into the JSON as it is.

Owns `Result` and `collect`, which reads a finished `Cluster`: per-node
completion times (from each node's own start; the dead left out) against the
bound, upstream copies per layer, and the tracker's load — announces and lease
requests, on average over the pull and at the busiest second, and what its
requests waited in the replicas' queues (server.py). It must not run
anything or format tables (report.py does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.simulate.cluster import Cluster


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of sorted `xs` (nearest rank)."""
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.999999) - 1))]


@dataclass
class Result:
    params: dict[str, Any]
    bound_s: float
    completion_s: list[float]  # sorted, surviving nodes only
    unfinished: int  # surviving nodes that did not finish by max_sim_s
    killed: int
    duration_s: float  # until the last surviving node finished
    first_copy_s: float  # every layer across U once (its first complete fetch)
    layer_first_s: list[float]  # when the first node held each layer (its holder, verified)
    layer_all_s: list[float]  # when every surviving node held each layer
    upstream_copies: float  # upstream bytes / image bytes
    upstream_layer_copies: list[float]
    announces: int
    announces_per_s: float
    announces_peak_s: int
    lease_asks: int
    lease_asks_per_s: float
    lease_asks_peak_s: int
    renewals: int
    releases: int
    publishes: int
    confirms: int
    riding_confirms: int  # of those, carried by a lease request
    lonely_announces: int  # downloads alone for stall_report_s that asked again
    stalled: int  # downloads whose peers all stalled (dead): reported, the lease wait again
    delisted: int  # peers the tracker stopped handing out on those reports
    entered: int  # peers control calls entered in swarms, in place of announces
    long_poll_wakeups: int
    leases_granted: int
    leases_expired: int
    leases_replaced: int
    granted_to_dead: int  # leases granted on a long poll whose node had died
    lost_acks: int  # grants passed on before their live holder's acknowledgement arrived
    fallbacks: dict[str, int]
    peer_bytes: int
    aborted_bytes: int
    refused_connections: int
    displaced_connections: int  # closed by a full peer to take a connection for a newer layer
    events: int
    wall_s: float
    # TrackerServers.stats over the pull (empty: every request answered at once).
    tracker_queue: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        xs = self.completion_s
        self.stats = {
            "p50_s": quantile(xs, 0.50),
            "p99_s": quantile(xs, 0.99),
            "max_s": xs[-1] if xs else float("nan"),
        }
        for key in ("p50_s", "p99_s", "max_s"):
            self.stats[key.replace("_s", "_x")] = self.stats[key] / self.bound_s

    def as_json(self, *, per_node: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not per_node:
            del out["completion_s"]
        return out


def collect(c: Cluster, wall_s: float) -> Result:
    p, tr = c.p, c.tracker
    alive = [n for n in c.nodes if n.alive]
    done = sorted(n.finished_at - n.start_at for n in alive if n.finished_at is not None)
    duration = max((n.finished_at for n in alive if n.finished_at is not None), default=0.0)
    span = max(duration, 1e-9)
    firsts = [
        min((t for n in c.nodes if (t := n.done_at[i]) is not None), default=float("nan"))
        for i in range(p.layers)
    ]
    alls = [
        max((t if (t := n.done_at[i]) is not None else float("inf")) for n in alive)
        for i in range(p.layers)
    ]
    counts = tr.counts
    in_pull = [v for s, v in counts.announces.items() if s < duration]
    asks = [v for s, v in counts.lease_asks.items() if s < duration]
    return Result(
        params=asdict(p),
        bound_s=p.bound_s,
        completion_s=done,
        unfinished=len(alive) - len(done),
        killed=c.killed,
        duration_s=duration,
        first_copy_s=max(firsts),
        layer_first_s=firsts,
        layer_all_s=alls,
        upstream_copies=sum(c.upstream_bytes) / p.image_bytes,
        upstream_layer_copies=[b / s for b, s in zip(c.upstream_bytes, c.sizes, strict=True)],
        announces=sum(counts.announces.values()),
        announces_per_s=sum(in_pull) / span,
        announces_peak_s=max(in_pull, default=0),
        lease_asks=sum(counts.lease_asks.values()),
        lease_asks_per_s=sum(asks) / span,
        lease_asks_peak_s=max(asks, default=0),
        renewals=counts.renewals,
        releases=counts.releases,
        publishes=counts.publishes,
        confirms=counts.confirms,
        riding_confirms=counts.riding,
        lonely_announces=c.stalls.lonely,
        stalled=c.stalls.stalled,
        delisted=c.tracker.admission.delisted,
        entered=counts.entered,
        long_poll_wakeups=counts.wakeups,
        leases_granted=tr.leases.granted,
        leases_expired=tr.leases.expired,
        leases_replaced=tr.leases.replacements,
        granted_to_dead=c.granted_to_dead,
        lost_acks=c.lost_acks,
        fallbacks=dict(c.fallbacks),
        peer_bytes=c.swarms.delivered,
        aborted_bytes=c.swarms.aborted,
        refused_connections=c.swarms.refused,
        displaced_connections=c.swarms.displaced,
        events=c.engine.events,
        wall_s=wall_s,
        tracker_queue=c.servers.stats(span) if c.servers.replicas else {},
    )
