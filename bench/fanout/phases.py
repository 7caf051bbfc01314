"""Where a fan-out run's time went, and how long a client stalled, from logs and samples.

Owns turning what a run left behind into numbers: each node's JSON log lines
`blob <digest> source=<source> …` into per-layer times (first layer verified
anywhere, first copy done, swarm done, spread to the first and the last peer),
ctr's own unpack time, the longest stretch a client received nothing (from the
0.5 s timeline), and the percentile rule every summary uses. Pure functions
over files and lists: it starts nothing and must not change what it reads.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.fanout.settings import is_p2p

_BLOB_LOG = re.compile(r"^blob (?P<digest>\S+) source=(?P<source>\S+) size=(?P<size>\d+) ")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class PullTimes(Protocol):
    """One node's pull, as far as the phases need it."""

    @property
    def pull_s(self) -> float: ...

    @property
    def unpack_s(self) -> float | None: ...


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def go_duration_s(text: str) -> float | None:
    parts = _GO_DURATION.findall(text)
    if not parts:
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def unpack_seconds(ctr_output: str) -> float | None:
    """ctr's own `done: <duration>` (the unpack), the last one it printed."""
    unpack_s: float | None = None
    for line in ctr_output.splitlines():
        if line.startswith("done:"):
            unpack_s = go_duration_s(line)
    return unpack_s


def blob_events(log: Path, t0_wall: float) -> list[tuple[str, str, float]]:
    """(digest, source, seconds after t0) for every blob a node fetched, from its JSON log."""
    events: list[tuple[str, str, float]] = []
    with contextlib.suppress(OSError):
        for line in log.read_text("utf-8", "replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            m = _BLOB_LOG.match(str(rec.get("msg", "")))
            if m is None:
                continue
            ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            events.append((m["digest"], m["source"], ts.timestamp() - t0_wall))
    return events


def _swarm_phases(node_logs: Sequence[Path], layers: set[str], t0_wall: float) -> dict[str, float]:
    phases: dict[str, float] = {}
    done: dict[str, list[float]] = {}
    sources: dict[str, int] = {}
    for log in node_logs:
        for digest, source, t in blob_events(log, t0_wall):
            if digest in layers:
                done.setdefault(digest, []).append(t)
                sources[source] = sources.get(source, 0) + 1
    if done:
        firsts = [min(ts) for ts in done.values()]
        # The first node to hold a layer verified got it over U (the lease holder).
        phases["first_copy_done_s"] = max(firsts)
        phases["first_layer_done_s"] = min(firsts)
        phases["swarm_done_s"] = max(max(ts) for ts in done.values())
        # Per layer: from the holder's verified copy to the first and the last peer's.
        spreads = [sorted(ts) for ts in done.values() if len(ts) > 1]
        if spreads:
            phases["layer_to_first_peer_median_s"] = percentile(
                [ts[1] - ts[0] for ts in spreads], 50
            )
            phases["layer_to_all_peers_median_s"] = percentile(
                [ts[-1] - ts[0] for ts in spreads], 50
            )
            phases["layer_to_all_peers_max_s"] = max(ts[-1] - ts[0] for ts in spreads)
    for source, count in sources.items():
        phases[f"layer_fetches_{source}"] = count
    return phases


def phases(
    mode: str,
    per_node: Sequence[PullTimes],
    node_logs: Sequence[Path],
    layers: set[str],
    t0_wall: float,
) -> dict[str, float]:
    """Where the time went: from the nodes' logs (p2p) and ctr's own unpack timing."""
    out: dict[str, float] = {}
    unpacks = [r.unpack_s for r in per_node if r.unpack_s is not None]
    fetched = [r.pull_s - (r.unpack_s or 0.0) for r in per_node]
    out["client_fetch_done_s"] = max(fetched)
    if unpacks:
        out["unpack_median_s"] = percentile(unpacks, 50)
        out["unpack_max_s"] = max(unpacks)
    if is_p2p(mode):
        out.update(_swarm_phases(node_logs, layers, t0_wall))
    return out


def longest_stall(timeline: list[dict[str, Any]], image_bytes: int) -> float:
    """The longest a client went without a new byte before it held the whole image.

    containerd's CRI (1.7 and later) cancels a pull that shows no progress for
    `image_pull_progress_timeout`; this is the figure to hold against it.
    Sampled every SAMPLE_S, so good to about that.
    """
    worst = 0.0
    for i in range(len(timeline[0]["client_bytes"]) if timeline else 0):
        since, held = 0.0, 0
        for sample in timeline:
            got = sample["client_bytes"][i]
            if got >= image_bytes:
                break
            if got > held:
                since, held = sample["t"], got
            worst = max(worst, sample["t"] - since)
    return worst
