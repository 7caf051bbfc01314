"""The fan-out benchmark's JSON document: every run, the summary per N, and the targets.

Owns choosing each (mode, N)'s representative run (the median time of its
repeats), the summary rows (bound, network-only bound, floor, ring, client,
each mode's time and upstream multiples), the targets the design sets, and
the document's keys, which docs/BENCHMARKS.md and docs/img/fanout.json
describe: change none of them. It computes from results only; it must not
print, plot or start anything.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from bench.fanout.capacity import Capacity, bounds
from bench.fanout.runs import RunResult
from bench.fanout.settings import CLIENT, MB, P2P_TLS, MiB, Settings, is_p2p
from harness.images import PushedImage

# The goal for TLS: p2p with TLS at most this many times p2p without, at N = 8.
TLS_OVER_PLAIN_MAX = 1.05


def _representatives(
    results: list[RunResult],
) -> tuple[dict[tuple[str, int], list[RunResult]], dict[tuple[str, int], RunResult]]:
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.mode, result.nodes), []).append(result)
    by: dict[tuple[str, int], RunResult] = {}
    for key, group in groups.items():
        ordered = sorted(group, key=lambda x: x.all_done_s)
        by[key] = ordered[(len(ordered) - 1) // 2]
        for run in group:
            run.representative = run is by[key]
    return groups, by


def _summary_row(
    n: int,
    settings: Settings,
    cap: Capacity,
    groups: dict[tuple[str, int], list[RunResult]],
    by: dict[tuple[str, int], RunResult],
    image_bytes: int,
) -> dict[str, Any]:
    client = by.get((CLIENT, n))
    bound, floor = bounds(cap, client.all_done_s if client else None, n)
    row: dict[str, Any] = {
        "nodes": n,
        "bound_s": bound,
        "bound_net_s": cap.first_copy_s + cap.ring_s.get(n, 0.0),
        "floor_s": floor,
        "ring_s": cap.ring_s.get(n),
        "client_s": client.all_done_s if client else None,
        "client_s_runs": [x.all_done_s for x in groups.get((CLIENT, n), [])],
    }
    for mode in settings.modes:
        r = by.get((mode, n))
        if r is not None:
            row[f"{mode}_s"] = r.all_done_s
            row[f"{mode}_s_runs"] = [x.all_done_s for x in groups[(mode, n)]]
            row[f"{mode}_upstream_link_x"] = (
                r.upstream_link_bytes / image_bytes if r.upstream_link_bytes is not None else None
            )
            row[f"{mode}_upstream_log_x"] = r.upstream_log_blob_bytes / image_bytes
    if row.get("p2p_s") and row.get(f"{P2P_TLS}_s"):
        # Medians against medians, from runs interleaved in the same benchmark.
        row["tls_over_plain"] = row[f"{P2P_TLS}_s"] / row["p2p_s"]
    return row


def document(
    settings: Settings,
    image: PushedImage,
    image_bytes: int,
    cap: Capacity,
    results: list[RunResult],
) -> dict[str, Any]:
    groups, by = _representatives(results)
    summary = [_summary_row(n, settings, cap, groups, by, image_bytes) for n in settings.nodes]
    return {
        "benchmark": "fanout",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "image": {
            "reference": f"{image.repository}:{image.tag}",
            "digest": image.digest,
            "bytes": image_bytes,
            "layers": [b.size for b in image.manifests[0].layers],
            "blobs": len(image.blobs),
        },
        "capacity": asdict(cap),
        "bound_formula": "bound = first_copy + max(ring(N), client(N)); "
        "bound_net = first_copy + ring(N); floor = max(first_copy, ring(N), client(N))",
        "summary": summary,
        "targets": targets(summary, results, settings),
        "runs": [asdict(r) for r in results],
    }


def _target_key(mode: str, key: str) -> str:
    """A target's key for `mode`: p2p keeps the names it always had, p2p_tls gets its own."""
    if key.startswith("p2p_"):
        return mode + key[len("p2p") :]
    return key if mode == "p2p" else f"{mode}_{key}"


def _multiple_targets(mode: str, summary: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ups = {row["nodes"]: row.get(f"{mode}_upstream_log_x") for row in summary}
    out[_target_key(mode, "upstream_log_x_le_1.05")] = {
        str(n): (x, x is not None and x <= 1.05) for n, x in ups.items()
    }
    links = {row["nodes"]: row.get(f"{mode}_upstream_link_x") for row in summary}
    if any(x is not None for x in links.values()):
        out[_target_key(mode, "upstream_link_x_le_1.05")] = {
            str(n): (x, x is not None and x <= 1.05) for n, x in links.items()
        }
    return out


def _mode_targets(
    mode: str, summary: list[dict[str, Any]], results: list[RunResult]
) -> dict[str, Any]:
    """The design's targets for one p2p mode (plain or TLS) against the same bound."""
    out = _multiple_targets(mode, summary)
    rows = {row["nodes"]: row for row in summary}
    at = f"{mode}_s"
    if 8 in rows and rows[8].get(at) is not None:
        ratio = rows[8][at] / rows[8]["bound_s"]
        out[_target_key(mode, "p2p_over_bound_at_8_le_1.5")] = (ratio, ratio <= 1.5)
        # The same against the network-only bound (first copy + ring, no client work).
        net = rows[8][at] / rows[8]["bound_net_s"]
        out[_target_key(mode, "p2p_over_net_bound_at_8_le_1.5")] = (net, net <= 1.5)
    if 4 in rows and 8 in rows and rows[4].get(at) and rows[8].get(at):
        growth = rows[8][at] / rows[4][at] - 1
        out[_target_key(mode, "p2p_growth_4_to_8_lt_0.20")] = (growth, growth < 0.20)
    rss = [
        r.node_peak_rss_mib
        for res in results
        if res.mode == mode
        for r in res.per_node
        if r.node_peak_rss_mib is not None
    ]
    if rss:
        peak_mb = max(rss) * MiB / MB
        out[_target_key(mode, "node_peak_rss_lt_200MB")] = (peak_mb, peak_mb < 200)
    return out


def targets(
    summary: list[dict[str, Any]], results: list[RunResult], settings: Settings
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in settings.modes:
        if is_p2p(mode):
            out.update(_mode_targets(mode, summary, results))
    rows = {row["nodes"]: row for row in summary}
    if 8 in rows and rows[8].get("tls_over_plain") is not None:
        ratio = rows[8]["tls_over_plain"]
        out[f"p2p_tls_over_p2p_at_8_le_{TLS_OVER_PLAIN_MAX}"] = (
            ratio,
            ratio <= TLS_OVER_PLAIN_MAX,
        )
    return out
