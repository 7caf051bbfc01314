"""Tables and the plot of simulated runs, and the comparison with the fan-out benchmark.

Owns how results read: `summary` pools each (profile, N, policy)'s seeds,
`markdown_table` and `validation_table` print what docs/BENCHMARKS.md shows,
`measured_fanout` reads the fan-out benchmark's own JSON (docs/img/fanout.json)
for the measured side, and `plot` draws p99/bound against N. It runs nothing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.simulate.result import quantile

TIMES, DASH = "\u00d7", "\u2013"  # for markdown
FANOUT_JSON = Path(__file__).resolve().parents[2] / "docs" / "img" / "fanout.json"


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (profile, N, policy), its seeds pooled."""
    groups: dict[tuple[str, int, str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        pr = r["params"]
        key = (r["profile"], pr["nodes"], pr["policy"], pr["holder_failures"], tracker_label(pr))
        groups.setdefault(key, []).append(r)
    rows = []
    for (profile, n, policy, holders, tracker), rs in sorted(groups.items()):
        queues = [r["tracker_queue"] for r in rs if r.get("tracker_queue")]
        pooled = sorted(x for r in rs for x in r["completion_s"])
        bound = rs[0]["bound_s"]
        rows.append({
            "profile": profile, "nodes": n, "policy": policy, "seeds": len(rs),
            "holder_failures": holders,
            "bound_s": bound,
            "p50_s": quantile(pooled, 0.5), "p99_s": quantile(pooled, 0.99),
            "max_s": pooled[-1] if pooled else float("nan"),
            "p99_seeds_s": [r["stats"]["p99_s"] for r in rs],
            "unfinished": sum(r["unfinished"] for r in rs),
            "killed": sum(r["killed"] for r in rs),
            "upstream_max": max(r["upstream_copies"] for r in rs),
            "upstream_mean": statistics.fmean(r["upstream_copies"] for r in rs),
            "announces_per_s": statistics.fmean(r["announces_per_s"] for r in rs),
            "announces_peak_s": max(r["announces_peak_s"] for r in rs),
            "lease_asks_per_s": statistics.fmean(r["lease_asks_per_s"] for r in rs),
            "lease_asks_peak_s": max(r["lease_asks_peak_s"] for r in rs),
            "expired": sum(r["leases_expired"] for r in rs),
            "replaced": sum(r["leases_replaced"] for r in rs),
            "granted": sum(r["leases_granted"] for r in rs),
            "renewals": sum(r["renewals"] for r in rs),
            "layers": rs[0]["params"]["layers"],
            "granted_to_dead": sum(r["granted_to_dead"] for r in rs),
            "lost_acks": sum(r.get("lost_acks", 0) for r in rs),
            "fallbacks": sum(sum(r["fallbacks"].values()) for r in rs),
            "wall_s": max(r["wall_s"] for r in rs),
            "tracker": tracker,
            "queue": {k: max(q[k] for q in queues) for k in queues[0]} if queues else {},
        })
    return rows


def tracker_label(params: dict[str, Any]) -> str:
    """How the run modelled the tracker: "instant", or replicas and announce path."""
    k = params.get("tracker_replicas", 0)
    return f"{k} replicas, {params.get('announces', 'direct')}" if k else "instant"


def queue_table(rows: list[dict[str, Any]]) -> str:
    """The serving replica's queue (the worst seed of each row): what a request
    waited before it was handled, how long requests waited at all, how busy it was."""
    head = (
        "| profile | N | policy | holder dies | tracker | requests | handshakes "
        "| queue p50 | queue p99 | queue max | saturated | busy | fronts' queue p99 |\n"
        "| --- | ---: | --- | :---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |\n"
    )
    lines = [
        f"| {r['profile']} | {r['nodes']:,} | {r['policy']} | "
        f"{'yes' if r['holder_failures'] else 'no'} | {r['tracker']} | "
        f"{q['requests']:,.0f} | {q['handshakes']:,.0f} | {_ms(q['wait_p50_s'])} | "
        f"{_ms(q['wait_p99_s'])} | {_ms(q['wait_max_s'])} | {q['saturated_s']:.2f} s | "
        f"{100 * q['busy_share']:.0f} % | {_ms(q['front_wait_p99_s'])} |"
        for r in rows
        if (q := r["queue"])
    ]
    return head + "\n".join(lines) + "\n" if lines else ""


def _ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| profile | N | policy | holder dies | tracker | seeds | p50 | p99 | max | bound "
        "| p99 / bound | upstream "
        "copies (mean, max) | announces/s (mean, peak) | lease requests/s (mean, peak) "
        "| wall |\n"
        "| --- | ---: | --- | :---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |\n"
    )
    lines = [
        f"| {r['profile']} | {r['nodes']:,} | {r['policy']} | "
        f"{'yes' if r['holder_failures'] else 'no'} | {r['tracker']} | {r['seeds']} | "
        f"{r['p50_s']:.1f} s | "
        f"{r['p99_s']:.1f} s | {r['max_s']:.1f} s | {r['bound_s']:.1f} s | "
        f"**{r['p99_s'] / r['bound_s']:.2f}{TIMES}** | "
        f"{r['upstream_mean']:.3f}, {r['upstream_max']:.3f} | "
        f"{r['announces_per_s']:,.0f}, {r['announces_peak_s']:,} | "
        f"{r['lease_asks_per_s']:,.0f}, {r['lease_asks_peak_s']:,} | {r['wall_s']:.0f} s |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def leases_table(rows: list[dict[str, Any]]) -> str:
    """What the lease book did, summed over each row's seeds: grants beyond one per
    layer are the extra upstream fetches (a takeover, or an expiry's next grant)."""
    head = (
        "| profile | N | policy | holder dies | tracker | seeds | grants | extra grants "
        "| taken over "
        "| expired | granted to the dead | acks too late | renewals | upstream copies (max) |\n"
        "| --- | ---: | --- | :---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |\n"
    )
    lines = [
        f"| {r['profile']} | {r['nodes']:,} | {r['policy']} | "
        f"{'yes' if r['holder_failures'] else 'no'} | {r['tracker']} | {r['seeds']} | "
        f"{r['granted']:,} | "
        f"{r['granted'] - r['layers'] * r['seeds']:,} | {r['replaced']:,} | {r['expired']:,} | "
        f"{r['granted_to_dead']:,} | {r['lost_acks']:,} | {r['renewals']:,} | "
        f"{r['upstream_max']:.3f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def measured_fanout(path: Path = FANOUT_JSON) -> dict[int, dict[str, list[float]]]:
    """Per N, the fan-out benchmark's p2p phases over its repeats (seconds)."""
    doc = json.loads(path.read_text())
    out: dict[int, dict[str, list[float]]] = {}
    for run in doc["runs"]:
        if run["mode"] != "p2p":
            continue
        ph = run["phases"]
        got = out.setdefault(run["nodes"], {})
        for key, value in (
            ("first_copy_s", ph["first_copy_done_s"]),
            ("layer_to_all_s", ph["layer_to_all_peers_median_s"]),
            ("swarm_done_s", ph["swarm_done_s"]),
            ("unpack_s", ph["unpack_median_s"]),
            ("all_done_s", run["all_done_s"]),
        ):
            got.setdefault(key, []).append(float(value))
    return out


def simulated_phases(results: list[dict[str, Any]]) -> dict[str, float]:
    """The same phases from simulated runs of one N (medians over seeds)."""
    def med(f: Any) -> float:
        return float(statistics.median(f(r) for r in results))

    return {
        "first_copy_s": med(lambda r: r["first_copy_s"]),
        "layer_to_all_s": med(lambda r: statistics.median(
            a - f for a, f in zip(r["layer_all_s"], r["layer_first_s"], strict=True))),
        "swarm_done_s": med(lambda r: r["duration_s"]),
    }


LABELS = {
    "first_copy_s": "first copy done (every layer verified by its holder)",
    "layer_to_all_s": "a layer from its holder to every node (median of layers)",
    "swarm_done_s": "swarm done (the last node holds every layer)",
    "all_done_s": "all done (swarm done + the measured unpack)",
}


def validation_rows(
    sim: dict[int, dict[str, float]], measured: dict[int, dict[str, list[float]]]
) -> list[dict[str, Any]]:
    rows = []
    for n in sorted(sim):
        got, m = dict(sim[n]), measured[n]
        got["all_done_s"] = got["swarm_done_s"] + statistics.median(m["unpack_s"])
        for key, label in LABELS.items():
            meas = statistics.median(m[key])
            rows.append({
                "nodes": n, "what": label, "simulated_s": got[key], "measured_s": meas,
                "measured_range_s": [min(m[key]), max(m[key])], "ratio": got[key] / meas,
            })
    return rows


def validation_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | phase | simulated | measured (median, range) | simulated / measured |\n"
        "| ---: | --- | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['nodes']} | {r['what']} | {r['simulated_s']:.1f} s | {r['measured_s']:.1f} s "
        f"({r['measured_range_s'][0]:.1f}{DASH}{r['measured_range_s'][1]:.1f}) | {r['ratio']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["profile"] for r in rows})
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4), squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        for policy, holders in sorted({(r["policy"], r["holder_failures"]) for r in rows}):
            sel = [
                r for r in rows
                if (r["profile"], r["policy"], r["holder_failures"]) == (profile, policy, holders)
            ]
            ns = [r["nodes"] for r in sel]
            name = f"{policy}, {'a holder dies' if holders else 'no holder dies'}"
            ax.plot(ns, [r["p99_s"] / r["bound_s"] for r in sel], "o-", label=f"{name}: p99")
        ax.axhline(1.5, color="grey", linestyle=":", label=f"target: p99 1.5{TIMES} bound")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("nodes N")
        ax.set_ylabel("p99 completion / bound (S/U + S/B)")
        ax.set_title(f"{profile}: 1 GB in 10 layers, 1 % of nodes fail")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
