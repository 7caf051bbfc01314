"""The fan-out benchmark's report: the progress line per run, the tables, and the plot.

Owns how a finished document looks to a person: one line per run as it ends,
then the time table against the bound, the upstream-bytes table, the per-node
p2p table with where the time went, the CPU-seconds table, the targets, and
the PNG (matplotlib, two panels: time and upstream multiples). It reads the
JSON document only (and a RunResult for the line); it must not compute what
the document does not hold, nor write anything but the plot it is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.fanout.runs import RunResult
from bench.fanout.settings import MB, P2P_MODES, P2P_TLS, is_p2p


def run_line(r: RunResult, image_bytes: int) -> str:
    up = ""
    if r.upstream_link_bytes is not None:
        up = f"link {r.upstream_link_bytes / image_bytes:.2f}x, "
    log_x = r.upstream_log_blob_bytes / image_bytes
    line = (
        f"{r.mode:>7} N={r.nodes} #{r.repeat + 1}: all done {r.all_done_s:.2f} s "
        f"(p50 {r.p50_s:.2f}, p90 {r.p90_s:.2f}); upstream {up}log {log_x:.2f}x the image; "
        f"machine {r.machine_busy:.0%} busy ({r.machine_busy_before:.0%} just before, "
        f"load {r.load_avg_before[0]:.2f})"
    )
    if is_p2p(r.mode) and "first_copy_done_s" in r.phases:
        line += (
            f"; first copy {r.phases['first_copy_done_s']:.1f} s, "
            f"swarm done {r.phases['swarm_done_s']:.1f} s"
        )
    return line + f"; longest client stall {r.phases['client_stall_max_s']:.1f} s"


def _fmt(x: float | None, unit: str = "", digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}{unit}"


def _has_tls(doc: dict[str, Any]) -> bool:
    return P2P_TLS in doc["settings"]["modes"]


def _time_table(doc: dict[str, Any], runs: dict[tuple[str, int], dict[str, Any]]) -> Table:
    settings = doc["settings"]
    image_bytes = doc["image"]["bytes"]
    where = (
        "loopback, no shaping"
        if settings["loopback"]
        else f"U = {settings['upstream_mbit']:g} Mbit/s, B = {settings['node_mbit']:g} Mbit/s"
    )
    t = Table(
        title=f"Pull fan-out: {image_bytes / MB:.0f} MB in {settings['layers']} layers, "
        f"{where}; pulled by {settings.get('client', 'ctr')}; seconds until the last node is done"
    )
    tls = _has_tls(doc)
    columns = ["N", "direct", "p2p"] + (["p2p TLS", "TLS/plain"] if tls else [])
    columns += ["bound", "p2p/bound", "net bound", "p2p/net", "floor", "first copy", "ring"]
    columns += ["client", "direct p50/p90", "p2p p50/p90"] + (["TLS p50/p90"] if tls else [])
    for col in columns:
        t.add_column(col, justify="right")
    cap = doc["capacity"]
    for row in doc["summary"]:
        n = row["nodes"]
        d, p, pt = runs.get(("direct", n)), runs.get(("p2p", n)), runs.get((P2P_TLS, n))
        ratio = row["p2p_s"] / row["bound_s"] if row.get("p2p_s") else None
        net = row["p2p_s"] / row["bound_net_s"] if row.get("p2p_s") else None
        cells = [str(n), _fmt(row.get("direct_s")), _fmt(row.get("p2p_s"))]
        if tls:
            cells += [_fmt(row.get(f"{P2P_TLS}_s")), _fmt(row.get("tls_over_plain"), "x", 3)]
        cells += [
            _fmt(row["bound_s"]),
            _fmt(ratio, "x", 2),
            _fmt(row["bound_net_s"]),
            _fmt(net, "x", 2),
            _fmt(row["floor_s"]),
            _fmt(cap["first_copy_s"]),
            _fmt(row["ring_s"]),
            _fmt(row["client_s"]),
        ]
        for r in [d, p] + ([pt] if tls else []):
            cells.append(f"{_fmt(r['p50_s'])}/{_fmt(r['p90_s'])}" if r else "-")
        t.add_row(*cells)

    return t


def _upstream_table(doc: dict[str, Any], runs: dict[tuple[str, int], dict[str, Any]]) -> Table:
    u = Table(
        title="Bytes that crossed the upstream link, as multiples of the image "
        "(link: registry veth tx; log: blob bytes docker-registry logged)"
    )
    p2p_modes = [m for m in P2P_MODES if m in doc["settings"]["modes"]]
    for col in ["N", "direct link", "direct log"] + [
        f"{m} {what}" for m in p2p_modes for what in ("link", "log", "MB (log)")
    ]:
        u.add_column(col, justify="right")
    for row in doc["summary"]:
        n = row["nodes"]
        cells = [
            str(n),
            _fmt(row.get("direct_upstream_link_x"), "x", 2),
            _fmt(row.get("direct_upstream_log_x"), "x", 2),
        ]
        for m in p2p_modes:
            p = runs.get((m, n))
            cells += [
                _fmt(row.get(f"{m}_upstream_link_x"), "x", 3),
                _fmt(row.get(f"{m}_upstream_log_x"), "x", 3),
                _fmt(p["upstream_log_blob_bytes"] / MB) if p else "-",
            ]
        u.add_row(*cells)

    return u


def _per_node_table(doc: dict[str, Any], runs: dict[tuple[str, int], dict[str, Any]]) -> Table:
    r = Table(
        title="Per node in p2p mode (max over nodes; CPU during the pull) and where "
        "the time went (s after the pulls started)"
    )
    for col in (
        "mode",
        "N",
        "node CPU s",
        "node peak RSS MiB",
        "containerd CPU s",
        "ctr CPU s",
        "unpack s (med)",
        "first layer",
        "first copy done",
        "swarm done",
        "layer to all peers",
        "client fetch done",
        "all done",
        "longest client stall",
        "machine busy",
    ):
        r.add_column(col, justify="right")
    for mode, row in [(m, row) for m in P2P_MODES for row in doc["summary"]]:
        p = runs.get((mode, row["nodes"]))
        if p is None:
            continue
        nodes = p["per_node"]
        ph = p["phases"]

        def mx(key: str, nodes: list[dict[str, Any]] = nodes) -> float | None:
            vals = [x[key] for x in nodes if x.get(key) is not None]
            return max(vals) if vals else None

        r.add_row(
            mode,
            str(row["nodes"]),
            _fmt(mx("node_cpu_s")),
            _fmt(mx("node_peak_rss_mib"), "", 0),
            _fmt(mx("containerd_cpu_s")),
            _fmt(mx("ctr_cpu_s")),
            _fmt(ph.get("unpack_median_s"), "", 2),
            _fmt(ph.get("first_layer_done_s")),
            _fmt(ph.get("first_copy_done_s")),
            _fmt(ph.get("swarm_done_s")),
            _fmt(ph.get("layer_to_all_peers_median_s")),
            _fmt(ph.get("client_fetch_done_s")),
            _fmt(p["all_done_s"]),
            _fmt(ph.get("client_stall_max_s")),
            f"{p['machine_busy']:.0%}",
        )

    return r


def _cpu_table(doc: dict[str, Any]) -> Table:
    c = Table(
        title="CPU seconds while the pulls ran, summed over hosts (machine: all cores' "
        "busy time, kernel and other users included)"
    )
    for col in (
        "mode",
        "N",
        "run",
        "machine",
        "nodes",
        "containerd",
        "ctr",
        "registry",
        "tracker",
        "busy before",
    ):
        c.add_column(col, justify="right")
    for run in doc["runs"]:
        cpu = run["cpu_s"]
        c.add_row(
            run["mode"],
            str(run["nodes"]),
            f"{run['repeat'] + 1}" + ("*" if run["representative"] else ""),
            _fmt(cpu.get("machine")),
            _fmt(cpu.get("nodes")),
            _fmt(cpu.get("containerd")),
            _fmt(cpu.get("ctr")),
            _fmt(cpu.get("registry")),
            _fmt(cpu.get("tracker")),
            f"{run['machine_busy_before']:.0%}",
        )
    return c


def report(doc: dict[str, Any], console: Console) -> None:
    runs = {(r["mode"], r["nodes"]): r for r in doc["runs"] if r["representative"]}
    console.print(_time_table(doc, runs))
    console.print(_upstream_table(doc, runs))
    console.print(_per_node_table(doc, runs))
    console.print(_cpu_table(doc))
    if doc["targets"]:
        console.print("targets: " + "; ".join(f"{k}: {v}" for k, v in doc["targets"].items()))


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["summary"]
    ns = [row["nodes"] for row in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("direct_s", "direct", "o-"),
        ("p2p_s", "p2p", "s-"),
        (f"{P2P_TLS}_s", "p2p with TLS", "d-"),
        ("bound_s", "bound: first copy + max(ring, client)", "kx--"),
        ("bound_net_s", "network-only bound: first copy + ring", "x-."),
        ("floor_s", "floor: max(first copy, ring, client)", "k+:"),
    ]
    for key, label, style in series:
        pts = [(n, row[key]) for n, row in zip(ns, rows, strict=True) if row.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("nodes pulling at once (N)")
    ax.set_ylabel("time until the last node is done (s)")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    for key, label, style in [
        ("direct_upstream_log_x", "direct", "o-"),
        ("p2p_upstream_log_x", "p2p", "s-"),
        (f"{P2P_TLS}_upstream_log_x", "p2p with TLS", "d-"),
    ]:
        pts = [(n, row[key]) for n, row in zip(ns, rows, strict=True) if row.get(key) is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax2.set_xlabel("nodes pulling at once (N)")
    ax2.set_ylabel("upstream bytes / image size (registry log)")
    ax2.set_xticks(ns)
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend()
    s = doc["settings"]
    where = (
        "loopback"
        if s["loopback"]
        else f"U={s['upstream_mbit']:g} Mbit/s, B={s['node_mbit']:g} Mbit/s"
    )
    fig.suptitle(
        f"p2preg pull fan-out: {doc['image']['bytes'] / MB:.0f} MB, "
        f"{s['layers']} layers, {where}, {doc['machine']['cpus']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
