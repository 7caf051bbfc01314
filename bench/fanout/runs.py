"""One fan-out run measured: N hosts pull at the same moment, and what that cost.

Owns starting the N client pulls at once (bench/fanout/clients.py: `ctr`, or
kubelet's CRI call; each pull's end is exact), sampling every 0.5 s the bytes
in each containerd, the upstream link's tx counter and machine busy (the
timeline, with a progress display), and then reading the per-node results
(pull time, unpack, CPU and peak RSS of nodes, containerd and ctr, the nodes'
peer/upstream byte counters), the upstream bytes the registry logged and the
CPU seconds per role. The processes under test come from the cluster module;
it must not start a server, and it kills only the pulls it started.
"""

from __future__ import annotations

import contextlib
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from bench.fanout.clients import Pull, client_daemon, prepare_pulls, stop_pulls
from bench.fanout.cluster import Cluster, Stage, start_stage
from bench.fanout.phases import longest_stall, percentile, phases, unpack_seconds
from bench.fanout.settings import CLIENT, SAMPLE_S, Settings, is_p2p
from bench.machine import BusyMeter, ProcStat, proc_stat
from harness.containerd import Containerd
from harness.images import ImageManifest, PushedImage
from harness.netns import Host
from harness.node import NodeProcess, metric_value
from harness.procs import http_get
from harness.registry import Registry


@dataclass
class NodeRun:
    """One host's pull in one run."""

    host: str
    ok: bool
    pull_s: float
    unpack_s: float | None
    ctr_cpu_s: float
    containerd_cpu_s: float
    containerd_peak_rss_mib: float
    node_cpu_s: float | None = None
    node_peak_rss_mib: float | None = None
    node_from_peers_bytes: float | None = None
    node_redundant_bytes: float | None = None
    node_slow_drops: float | None = None  # peers its slow-peer watch disconnected
    # Its libtorrent's announces: sent on to the tracker by its relay, and answered by
    # the relay itself from the peers its chunk lists named (chunk torrents).
    node_announces_forwarded: float | None = None
    node_announces_local: float | None = None
    node_from_upstream_bytes: float | None = None
    node_fallbacks: float | None = None
    error: str | None = None


@dataclass
class RunResult:
    mode: str
    nodes: int
    all_done_s: float
    p50_s: float
    p90_s: float
    upstream_link_bytes: int | None
    upstream_log_blob_bytes: int
    upstream_log_all_bytes: int
    machine_busy: float
    machine_busy_before: float
    cpu_s: dict[str, float]
    phases: dict[str, float]
    per_node: list[NodeRun]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    repeat: int = 0
    # The 1, 5 and 15 minute load averages just before the pulls (others share the machine).
    load_avg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The run of its (mode, N) with the median time: the one tables and targets use.
    representative: bool = True
    # The tracker's seed confirmations over the run, and those that came with a lease
    # request (tracker/confirm_rides.py); None without a tracker or its metrics.
    tracker_seed_confirms: float | None = None
    tracker_riding_confirms: float | None = None


@dataclass
class _Before:
    """What was counted just before the pulls started."""

    busy: float
    load_avg: tuple[float, float, float]
    log_requests: int
    tx: int | None
    nodes: list[ProcStat]
    daemons: list[ProcStat]
    registry: ProcStat
    tracker: ProcStat | None


def _count_before(stage: Stage, cluster: Cluster) -> _Before:
    # Other work on the machine skews every number: say how busy it was just before.
    idle_meter = BusyMeter()
    time.sleep(1.0)
    busy = idle_meter.busy()
    return _Before(
        busy=busy,
        load_avg=os.getloadavg(),
        log_requests=len(stage.registry.served_requests()),
        tx=cluster.tx_bytes(stage.link_host),
        nodes=[proc_stat(nd.process.pid) for nd in stage.nodes],
        daemons=[proc_stat(d.process.pid) for d in stage.daemons],
        registry=proc_stat(stage.registry.process.pid),
        tracker=proc_stat(stage.tracker.pid) if stage.tracker is not None else None,
    )


@dataclass
class _Watch:
    """The pulls of one run while they go: the timeline, progress, and a deadline."""

    mode: str
    hosts: list[Host]
    stage: Stage
    cluster: Cluster
    tx_before: int | None
    image_bytes: int
    t0: float
    timeout_s: float

    def sample(
        self, pulls: list[Pull], console: Console
    ) -> tuple[list[dict[str, Any]], list[str]]:
        timeline: list[dict[str, Any]] = []
        failures: list[str] = []
        meter = BusyMeter()
        columns = (
            TextColumn("{task.description:>12}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            up_total = self.image_bytes * (1 if is_p2p(self.mode) else len(self.hosts))
            up_task = progress.add_task(f"{self.mode} upstream", total=up_total)
            tasks = [
                progress.add_task(f"{self.mode} {h.role}", total=self.image_bytes)
                for h in self.hosts
            ]
            while not all(p.reaped.is_set() for p in pulls):
                if time.monotonic() > self.t0 + self.timeout_s:
                    failures.append(f"pulls still running after {self.timeout_s} s")
                    break
                got = [content_bytes(d) for d in self.stage.daemons]
                up = self._upstream_tx()
                timeline.append(
                    {
                        "t": round(time.monotonic() - self.t0, 3),
                        "upstream_tx": up,
                        "client_bytes": got,
                        "busy": round(meter.busy(), 3),
                    }
                )
                for task, g, p in zip(tasks, got, pulls, strict=True):
                    done = self.image_bytes if p.reaped.is_set() else min(g, self.image_bytes)
                    progress.update(task, completed=done)
                if up is not None:
                    progress.update(up_task, completed=min(up, up_total))
                time.sleep(SAMPLE_S)
        return timeline, failures

    def _upstream_tx(self) -> int | None:
        tx = self.cluster.tx_bytes(self.stage.link_host)
        return (tx - self.tx_before) if tx is not None and self.tx_before is not None else None


def content_bytes(daemon: Containerd) -> int:
    """Bytes in a containerd's content store, finished and in flight."""
    total = 0
    for dirpath, _dirs, files in os.walk(daemon.root / "io.containerd.content.v1.content"):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _fallbacks(metrics: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("p2preg_fallbacks_total")
    )


def _add_node_counters(run: NodeRun, node: NodeProcess, before: ProcStat) -> None:
    st = proc_stat(node.process.pid)
    metrics = node.metrics()
    run.node_cpu_s = st.cpu_s - before.cpu_s
    run.node_peak_rss_mib = st.peak_rss_mib
    run.node_from_peers_bytes = metric_value(metrics, "p2preg_peer_blob_bytes_total")
    run.node_redundant_bytes = metric_value(metrics, "p2preg_peer_redundant_bytes_total")
    run.node_slow_drops = metric_value(metrics, "p2preg_peer_slow_drops_total")
    relayed = "p2preg_relay_announces_total"
    run.node_announces_forwarded = metric_value(metrics, relayed, result="answered")
    run.node_announces_local = metric_value(metrics, relayed, result="local")
    run.node_from_upstream_bytes = metric_value(metrics, "p2preg_upstream_blob_bytes_total")
    run.node_fallbacks = _fallbacks(metrics)


def _node_runs(
    hosts: list[Host],
    stage: Stage,
    pulls: list[Pull],
    before: _Before,
    manifest: ImageManifest,
    settings: Settings,
    t0: float,
) -> list[NodeRun]:
    per_node: list[NodeRun] = []
    for i, (host, daemon, pull) in enumerate(zip(hosts, stage.daemons, pulls, strict=True)):
        out = pull.out.read_text("utf-8", "replace")
        daemon = client_daemon(daemon, settings)
        if settings.unpack:
            ok = pull.rc == 0 and daemon.is_unpacked(manifest)
        else:
            ok = pull.rc == 0 and {b.digest for b in manifest.blobs} <= daemon.content_digests()
        after = proc_stat(daemon.process.pid)
        run = NodeRun(
            host=host.role,
            ok=ok,
            pull_s=(pull.end - t0) if pull.end is not None else float("nan"),
            unpack_s=unpack_seconds(out),
            ctr_cpu_s=pull.cpu_s,
            containerd_cpu_s=after.cpu_s - before.daemons[i].cpu_s,
            containerd_peak_rss_mib=after.peak_rss_mib,
            error=None if ok else out[-2000:],
        )
        if stage.nodes:
            _add_node_counters(run, stage.nodes[i], before.nodes[i])
        per_node.append(run)
    return per_node


@dataclass
class _Upstream:
    """What crossed the upstream link during the pulls, and what the registry and tracker used."""

    link_bytes: int | None
    log_blob_bytes: int
    log_all_bytes: int
    registry_cpu_s: float
    tracker_cpu_s: float | None
    confirms: tuple[float | None, float | None]  # the tracker's seed confirmations, riding


def _count_upstream(stage: Stage, cluster: Cluster, before: _Before) -> _Upstream:
    registry = stage.registry
    registry_cpu = proc_stat(registry.process.pid).cpu_s - before.registry.cpu_s
    tracker_cpu = (
        proc_stat(stage.tracker.pid).cpu_s - before.tracker.cpu_s
        if stage.tracker is not None and before.tracker is not None
        else None
    )
    registry.settle(timeout_s=15.0)
    tx_after = cluster.tx_bytes(stage.link_host)
    served = registry.served_requests()[before.log_requests :]
    return _Upstream(
        link_bytes=(tx_after - before.tx)
        if tx_after is not None and before.tx is not None
        else None,
        log_blob_bytes=sum(r.written for r in served if r.blob is not None and r.method == "GET"),
        log_all_bytes=sum(r.written for r in served),
        registry_cpu_s=registry_cpu,
        tracker_cpu_s=tracker_cpu,
        confirms=_tracker_confirms(stage),
    )


def _tracker_confirms(stage: Stage) -> tuple[float | None, float | None]:
    """The tracker's seed confirmations and riding ones so far (its tracker is new each
    run), asked from inside its namespace."""
    if stage.tracker_metrics_url is None:
        return None, None
    try:
        text = http_get(stage.tracker_metrics_url, netns=stage.tracker_netns).text
    except httpx.HTTPError:
        return None, None
    if "# HELP p2preg_tracker_riding_confirms_total " not in text:
        return None, None
    return (
        metric_value(text, "p2preg_tracker_seed_confirms_total"),
        metric_value(text, "p2preg_tracker_riding_confirms_total"),
    )


def _cpu_seconds(
    busy: float, elapsed: float, per_node: list[NodeRun], up: _Upstream, with_nodes: bool
) -> dict[str, float]:
    # Where the CPU went while the pulls ran, summed over hosts; "machine" is all
    # cores' busy time, including the kernel's networking and anyone else's work.
    cpu_s: dict[str, float] = {
        "machine": busy * (os.cpu_count() or 1) * elapsed,
        "containerd": sum(r.containerd_cpu_s for r in per_node),
        "ctr": sum(r.ctr_cpu_s for r in per_node),
        "registry": up.registry_cpu_s,
    }
    if with_nodes:
        cpu_s["nodes"] = sum(r.node_cpu_s or 0.0 for r in per_node)
    if up.tracker_cpu_s is not None:
        cpu_s["tracker"] = up.tracker_cpu_s
    return cpu_s


def run_once(
    mode: str,
    n: int,
    cluster: Cluster,
    seed: Registry,
    fast: Registry | None,
    image: PushedImage,
    image_bytes: int,
    settings: Settings,
    run_dir: Path,
    console: Console,
) -> RunResult:
    """Start fresh nodes/daemons, pull on all `n` hosts at the same moment, measure, stop."""
    hosts = cluster.node_hosts[:n]
    registry = fast if mode == CLIENT and fast is not None else seed
    link_host = cluster.fast_host if registry is fast else cluster.seed_host
    ref = f"{registry.host}/{image.repository}:{image.tag}"
    manifest = image.manifests[0]
    with ExitStack() as stack:
        with console.status(
            f"{mode} N={n}: starting {n} containerd"
            + (f", a tracker and {n} nodes…" if is_p2p(mode) else "…")
        ):
            stage = start_stage(
                stack,
                mode,
                hosts,
                registry,
                link_host,
                settings,
                run_dir,
                cluster.tracker_host,
                cluster.certs,
            )
        before = _count_before(stage, cluster)
        meter = BusyMeter()
        pulls = prepare_pulls(hosts, stage, ref, settings, run_dir)
        t0_wall, t0 = time.time(), time.monotonic()
        for pull in pulls:
            pull.start()
        watch = _Watch(
            mode, hosts, stage, cluster, before.tx, image_bytes, t0, settings.pull_timeout_s
        )
        try:
            timeline, failures = watch.sample(pulls, console)
        finally:
            stop_pulls(pulls)
        busy = meter.busy()
        elapsed = time.monotonic() - t0
        up = _count_upstream(stage, cluster, before)
        per_node = _node_runs(hosts, stage, pulls, before, manifest, settings, t0)
        failures += [
            f"{r.host}: pull failed (exit {p.rc})"
            for r, p in zip(per_node, pulls, strict=True)
            if not r.ok
        ]
        layers = {b.digest for b in manifest.layers}
        node_logs = [nd.process.log_path for nd in stage.nodes]
        run_phases = phases(mode, per_node, node_logs, layers, t0_wall)
        run_phases["client_stall_max_s"] = longest_stall(timeline, image_bytes)
    times = [r.pull_s for r in per_node]
    return RunResult(
        mode=mode,
        nodes=n,
        all_done_s=max(times),
        p50_s=percentile(times, 50),
        p90_s=percentile(times, 90),
        upstream_link_bytes=up.link_bytes,
        upstream_log_blob_bytes=up.log_blob_bytes,
        upstream_log_all_bytes=up.log_all_bytes,
        machine_busy=busy,
        machine_busy_before=before.busy,
        load_avg_before=before.load_avg,
        cpu_s=_cpu_seconds(busy, elapsed, per_node, up, bool(stage.nodes)),
        phases=run_phases,
        per_node=per_node,
        timeline=timeline,
        failures=failures,
        tracker_seed_confirms=up.confirms[0], tracker_riding_confirms=up.confirms[1],
    )
