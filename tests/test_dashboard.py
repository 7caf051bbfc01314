"""deploy/grafana: every panel of the dashboard shows data from a real cluster.

Grafana is not in Debian 12, but what a panel shows is its PromQL, so Debian's
Prometheus stands in: it scrapes a real cluster (a tracker, two nodes that pull
one image through their own containerd, one layer of 3 MiB so the second node
takes it from the first through the swarm) on the nodes' and the tracker's
plain metrics listeners, as the monitoring component's PodMonitors do. Then
every query of every panel, with Grafana's interval variables filled in, must
return at least one series within a bounded wait: a metric renamed in the code
and not in the dashboard fails here. A third node whose two trackers are both
down (closed ports) fetches the layer too, so the panels of tracker failovers
and fallbacks have a series to show, as they would in a cluster with a replica
down. The unit tests below are the cheap guard: the files parse, every query
names only metrics docs/OPERATIONS.md documents, and none hides a missing
metric behind a constant.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness.containerd import Containerd, open_containerd, write_hosts_toml
from harness.images import build_image
from harness.node import NodeProcess, open_node
from harness.procs import WaitTimeout, free_port, wait_until
from harness.prometheus import Prometheus, open_prometheus
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "p2preg.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
SEED_NS = "seed.test"
MiB = 1024 * 1024
LAYER = 3 * MiB  # above the node's p2p threshold (1 MiB): the swarm's

# Grafana's built-in interval variables, about as Grafana fills them for a
# Prometheus scraped every second (the harness's interval) over the last hour:
# $__rate_interval is max($__interval + scrape interval, 4 x scrape interval).
GRAFANA_VARIABLES = {"$__rate_interval": "6s", "$__interval": "5s", "$__range": "1h"}
# A query that could answer without its metric would hide a rename.
CONSTANTS = re.compile(r"\b(vector|absent|absent_over_time|scalar|time)\s*\(|\bor\b")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too; rows themselves are not panels."""
    for panel in dashboard["panels"]:
        yield from panel.get("panels", [])
        if panel["type"] != "row":
            yield panel


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expr) of every target."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in _panels(dashboard)
        for t in p["targets"]
    ]


def _as_prometheus_runs_it(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def _documented() -> dict[str, str]:
    """Metric name (as scraped) → its type, from docs/OPERATIONS.md's metric tables."""
    out = {}
    for line in OPERATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`p2preg_"):
            for name in re.findall(r"`(p2preg_[a-z_]+)", cells[0]):
                out[name] = cells[1]
    return out


# -- the files ---------------------------------------------------------------------------------


def test_the_provisioning_files_load_the_dashboard_for_a_prometheus_datasource() -> None:
    provisioning = GRAFANA / "provisioning"
    (datasources,) = yaml.safe_load_all((provisioning / "datasources/p2preg.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["url"].startswith("http")
    (providers,) = yaml.safe_load_all((provisioning / "dashboards/p2preg.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    # The datasource is a variable: the provisioned one, or any Prometheus of the user's.
    (var,) = dashboard["templating"]["list"]
    assert (var["name"], var["type"], var["query"]) == ("datasource", "datasource", "prometheus")
    want = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    panels = list(_panels(dashboard))
    assert len(panels) >= 15
    for p in panels:
        assert p["datasource"] == want and p["title"] and p["description"], p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == want for t in p["targets"]), p["title"]


def test_the_panels_tile_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[x, y] = p["title"]


def test_every_query_names_only_documented_metrics_and_hides_no_missing_one() -> None:
    documented = _documented()
    assert len(documented) > 25
    named: set[str] = set()
    for where, expr in _queries(_dashboard()):
        assert not CONSTANTS.search(expr), f"{where}: answers without its metric: {expr}"
        left = _as_prometheus_runs_it(expr)
        assert "$" not in left, f"{where}: a variable Prometheus cannot fill: {expr}"
        metrics = set(re.findall(r"\bp2preg_[a-z_]+\b", expr))
        assert metrics, f"{where}: names no p2preg metric"
        for name in metrics:
            base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s)), None)
            if base is not None and documented.get(base) == "histogram":
                name = base
            assert name in documented, f"{where}: {name} is not in docs/OPERATIONS.md"
            named.add(name)
    # What the dashboard is for: savings, peers against upstream, pull latency,
    # swarm and lease health, the trackers' announces and the nodes' failovers.
    assert {
        "p2preg_peer_blob_bytes_total", "p2preg_upstream_blob_bytes_total",
        "p2preg_blob_bytes_served_total", "p2preg_blob_fetch_seconds",
        "p2preg_tracker_swarms", "p2preg_tracker_seeders", "p2preg_fallbacks_total",
        "p2preg_tracker_leases", "p2preg_tracker_lease_grants_total",
        "p2preg_tracker_announces_total", "p2preg_tracker_failovers_total",
    } <= named


# -- against a cluster -------------------------------------------------------------------------


def _values(prom: Prometheus, expr: str) -> list[float]:
    return [float(sample["value"][1]) for sample in prom.query(_as_prometheus_runs_it(expr))]


def _wait_for_every_query(prom: Prometheus, queries: list[tuple[str, str]]) -> None:
    """Ask each query until it returns a series; fail naming every one that never did."""
    empty = dict(queries)

    def all_answered() -> bool:
        for where, expr in list(empty.items()):
            if prom.query(_as_prometheus_runs_it(expr)):  # a PromQLError fails at once
                del empty[where]
        return not empty

    try:
        wait_until(all_answered, timeout_s=60, what="every panel's query", interval_s=1.0)
    except WaitTimeout:
        pytest.fail(f"panels whose query returned no series: {json.dumps(empty, indent=2)}")


@pytest.mark.integration
@pytest.mark.slow
def test_every_panel_query_returns_a_series_from_a_cluster_after_one_pull(
    registry: Registry, tmp_path: Path
) -> None:
    layout = build_image(tmp_path / "layout", seed="dashboard", layer_sizes=(LAYER,))
    image = push(layout, registry.host, "team/app")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    layer = image.manifests[0].layers[0]
    upstream = [f"{SEED_NS}={registry.url}"]
    with ExitStack() as stack:
        tracker_metrics = f"127.0.0.1:{free_port()}"
        tracker = stack.enter_context(
            open_tracker(tmp_path / "tracker", args=("--metrics-listen", tracker_metrics))
        )

        def node(name: str, trackers: list[str], *extra: str) -> tuple[NodeProcess, str]:
            metrics = f"127.0.0.1:{free_port()}"
            args = [f"--tracker={t}" for t in trackers]
            args += ["--peer-host", "127.0.0.1", "--peer-port", "0", "--node-name", name]
            args += ["--metrics-listen", metrics, *extra]
            n = stack.enter_context(
                open_node(tmp_path / name, upstream, args=tuple(args), name=name)
            )
            return n, metrics

        hosts = {name: tmp_path / f"hosts-{name}" for name in ("a", "b")}
        # Node a also checks its host's containerd config (the kubelet-path panel).
        containerd_toml = tmp_path / "containerd-config.toml"
        containerd_toml.write_text(
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
            f'  config_path = "{hosts["a"]}"\n'
        )
        a, a_metrics = node(
            "a", [tracker.url], "--containerd-config", str(containerd_toml),
            "--containerd-version", "1.6.20", "--containerd-hosts-dir", str(hosts["a"]),
        )
        b, b_metrics = node("b", [tracker.url])
        down = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        c, c_metrics = node("c", down)
        prom = stack.enter_context(open_prometheus(tmp_path / "prometheus", {
            "p2preg-node": [a_metrics, b_metrics, c_metrics],
            "p2preg-tracker": [tracker_metrics],
        }))
        # Scraped before the pull, so the rates and increases see it happen.
        wait_until(
            lambda: [t["health"] for t in prom.targets()] == ["up"] * 4,
            timeout_s=30, what="Prometheus scraping all four members", interval_s=0.5,
        )

        for name, n in (("a", a), ("b", b)):
            daemon: Containerd = stack.enter_context(open_containerd(tmp_path / f"ctrd-{name}"))
            write_hosts_toml(hosts[name], SEED_NS, n.url)
            daemon.pull(ref, hosts[name])
            assert daemon.is_unpacked(image.manifests[0])
        assert b.metric("p2preg_peer_blob_bytes_total") >= LAYER, "b took the layer from a"
        with httpx.Client(trust_env=False, timeout=120) as http:
            got = http.get(f"{c.url}/v2/{image.repository}/blobs/{layer.digest}")
        assert got.status_code == 200
        assert f"sha256:{hashlib.sha256(got.content).hexdigest()}" == layer.digest
        assert c.metric("p2preg_fallbacks_total", reason="tracker") == 1

        _wait_for_every_query(prom, _queries(_dashboard()))

        # The headline numbers say what happened: b's layer came from a, not upstream.
        stats = {p["title"]: p["targets"][0]["expr"] for p in _panels(_dashboard())}

        def saved_and_ratio() -> bool:
            (saved,) = _values(prom, stats["Upstream bytes saved"])
            (ratio,) = _values(prom, stats["Upstream bytes per byte served"])
            return saved >= LAYER * 0.9 and math.isfinite(ratio) and 0 < ratio < 1

        wait_until(saved_and_ratio, timeout_s=30, what="the savings panels", interval_s=1.0)
