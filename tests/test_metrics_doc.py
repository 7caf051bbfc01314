"""docs/OPERATIONS.md documents every metric the node and the tracker export, with an alert.

The metric names come from the live registries (`NodeMetrics`, `TrackerMetrics`
with its scrape-time gauges), so a metric added to the code without a row in
the operator's documentation fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from p2preg.node.metrics import NodeMetrics
from tracker.metrics import Gauges, TrackerMetrics

DOC = Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md"


def _exported(registry: CollectorRegistry) -> set[str]:
    """Names as scraped: counters with their `_total`."""
    names = set()
    for family in registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def _rows() -> dict[str, list[str]]:
    """Metric name → the cells of its table row (one row may name several metrics)."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`p2preg_"):
            continue
        for name in re.findall(r"`(p2preg_[a-z_]+)", cells[0]):
            rows[name] = cells
    return rows


def test_every_node_and_tracker_metric_has_a_documented_row_with_an_alert() -> None:
    tracker = TrackerMetrics()
    tracker.watch(lambda: Gauges(0, 0, 0, 0, 0, 0, 0))
    node = NodeMetrics()
    node.watch_containerd(lambda: {"ok": True})  # registered only on nodes that check
    exported = _exported(node.registry) | _exported(tracker.registry)
    assert len(exported) > 25
    rows = _rows()
    missing = sorted(exported - set(rows))
    assert not missing, f"metrics without a row in docs/OPERATIONS.md: {missing}"
    for name in exported:
        _, kind, what, alert = rows[name]
        assert kind in ("counter", "gauge", "histogram"), name
        assert what and alert, f"{name}: say what it counts and what to alert on"
    stale = sorted(set(rows) - exported)
    assert not stale, f"documented metrics the code no longer exports: {stale}"
