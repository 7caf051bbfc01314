"""`render_page`: the cluster page, one self-contained HTML document from a `ClusterView`.

Owns how the view looks: tables of nodes, images (how far each blob spread),
blobs, traffic and leases, with inline CSS and no script, and a line under each
figure saying where it comes from. Every value that came from a node — names,
digests, image names, reasons — is HTML-escaped here, in `_e`, and nowhere
else is text put into the page. It must not read the tracker (cluster_view
does) or speak HTTP (admin_http does).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence

from tracker.cluster_view import BlobRow, ClusterView, ImageRow, LeaseRow, NodeRow

CONTENT_TYPE = "text/html; charset=utf-8"
_STAMP = "%Y-%m-%d %H:%M:%S UTC"
_LEASE_HEAD = ("blob", "holder", "image", "progress", "still for", "expires in", "waiting", "state")
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.4em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font-size:12px;word-break:break-all}.note{color:#666;font-size:12px;max-width:60em}
.bar{display:inline-block;height:.7em;background:#ddd;width:8em;vertical-align:middle}
.bar span{display:block;height:100%;background:#3a7}
tr.stuck td{background:#fde8e8}.none{color:#888}
"""


def _e(value: object) -> str:
    """The one way text enters the page: escaped, quotes too."""
    return html.escape(str(value), quote=True)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(cls: str, head: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="none">{_e(empty)}</p>'
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _more(shown: int, total: int, what: str) -> str:
    return "" if shown >= total else f'<p class="note">and {total - shown} more {_e(what)}</p>'


def _spread(blob: BlobRow, nodes: int) -> str:
    share = 0 if nodes == 0 else min(100, round(100 * blob.seeders / nodes))
    return (
        f'<td class="spread">{blob.seeders} seeding, {blob.leechers} downloading, '
        f'of {nodes} nodes <span class="bar"><span style="width:{share}%"></span></span></td>'
    )


def _node_row(n: NodeRow) -> str:
    return (
        f'<tr class="node"><td class="name">{_e(n.name)}</td>'
        f'<td class="n">{n.last_announce_ago_s:.0f} s ago</td><td class="n">{n.seeding}</td>'
        f'<td class="n">{n.leeching}</td><td class="n">{_bytes(n.uploaded)}</td>'
        f'<td class="n">{_bytes(n.downloaded)}</td></tr>'
    )


def _blob_row(b: BlobRow, nodes: int) -> str:
    published = "not filed yet" if b.published_by is None else b.published_by
    return (
        f'<tr class="blob"><td><code class="digest">{_e(b.digest)}</code></td>'
        f'<td class="n">{_bytes(b.size)}</td>{_spread(b, nodes)}'
        f'<td class="n">{b.completed}</td><td>{_e(published)}</td></tr>'
    )


def _image_rows(image: ImageRow, nodes: int) -> str:
    head = (
        f'<tr class="image"><th colspan="3"><code class="image-name">{_e(image.name)}</code>: '
        f"{image.seeded_blobs} of {len(image.blobs)} blobs seeded in the cluster; "
        f"{image.queued} lease requests waiting for an upstream slot</th></tr>"
    )
    rows = "".join(
        f'<tr class="image-blob"><td><code class="digest">{_e(b.digest)}</code></td>'
        f'<td class="n">{_bytes(b.size)}</td>{_spread(b, nodes)}</tr>'
        for b in image.blobs
    )
    return head + rows


def _lease_row(r: LeaseRow) -> str:
    cls = "lease stuck" if r.stuck else "lease"
    image = "" if r.image is None else r.image
    return (
        f'<tr class="{cls}"><td><code class="digest">{_e(r.digest)}</code></td>'
        f'<td class="holder">{_e(r.holder)}</td><td><code>{_e(image)}</code></td>'
        f'<td class="n">{_bytes(r.bytes_done)} of {_bytes(r.size)}</td>'
        f'<td class="n">{r.still_s:.0f} s</td><td class="n">{r.expires_in_s:.0f} s</td>'
        f'<td class="n">{r.waiting}</td><td class="why">{_e(r.stuck or "moving")}</td></tr>'
    )


def _traffic(view: ClusterView) -> str:
    t = view.traffic
    rows = (
        ("upstream: published blobs", _bytes(t.published_bytes),
         "Sum of the sizes of the blobs whose torrent is filed. Each crossed the upstream link at "
         "least once, fetched by the node that filed it. Fetches without a lease (small blobs, a "
         "tracker out of reach) are not seen here."),
        ("upstream: leased fetches under way", _bytes(t.leased_bytes),
         "Progress the holders of live leases reported."),
        ("upstream: leases granted / handed over", f"{t.lease_grants} / {t.lease_replacements}",
         "Since the tracker started; a hand-over is a second upstream fetch of a blob whose first "
         "holder fell below the minimum rate."),
        ("between nodes: completed downloads", _bytes(t.completed_bytes),
         "Completed swarm downloads (announces with event=completed) since the tracker started, "
         "times the blob's size."),
        ("between nodes: reported uploaded", _bytes(t.reported_uploaded),
         "Sum of the uploaded counters in the latest announce of each live peer: what nodes say "
         "they served to others. Counters restart with a node; expired peers drop out."),
        ("between nodes: reported downloaded", _bytes(t.reported_downloaded),
         "The same for downloaded."),
    )
    body = "".join(
        f'<tr class="traffic"><td>{_e(name)}</td><td class="n">{_e(value)}</td>'
        f'<td class="note">{_e(note)}</td></tr>'
        for name, value, note in rows
    )
    return _table("traffic", ("figure", "bytes", "what it is"), [body], "")


def render_page(view: ClusterView, *, title: str = "p2preg cluster") -> bytes:
    """The whole page, as UTF-8 bytes."""
    nodes = view.node_count
    images = "".join(_image_rows(i, nodes) for i in view.images)
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
        f'<p class="note">Read-only, as of {_e(time.strftime(_STAMP, time.gmtime()))}. '
        f"Nodes: {view.node_count} · images: {view.image_count} · blobs: {view.blob_count} · "
        f"leases: {view.lease_count}, stuck: {view.stuck_count}. Reload to refresh.</p>",
        '<h2 id="traffic">Upstream against between nodes</h2>',
        _traffic(view),
        '<h2 id="leases">Upstream leases</h2>',
        f'<p class="note">Stuck: no progress for longer than a rate window '
        f"({view.rate_window_s:g} s), or below the minimum rate "
        f"({_bytes(view.min_rate_bytes_s)}/s).</p>",
        _table("leases", _LEASE_HEAD, (_lease_row(r) for r in view.leases), "No lease is held."),
        _more(len(view.leases), view.lease_count, "leases"),
        '<h2 id="nodes">Nodes</h2>',
        '<p class="note">Identities with a live peer in some swarm; byte counters are those of '
        "their latest announces.</p>",
        _table("nodes", ("node", "last announce", "seeding", "downloading", "uploaded",
                         "downloaded"), (_node_row(n) for n in view.nodes),
               "No node has announced."),
        _more(len(view.nodes), view.node_count, "nodes"),
        '<h2 id="images">Images</h2>',
        '<p class="note">As named by the nodes\' upstream lease requests (the manifest digest); '
        "forgotten when the tracker restarts, until the next pull names them again.</p>",
        f'<table class="images">{images}</table>' if images
        else '<p class="none">No image has been named yet.</p>',
        _more(len(view.images), view.image_count, "images"),
        '<h2 id="blobs">Blobs</h2>',
        _table("blobs", ("blob", "size", "spread", "completed", "torrent filed by"),
               (_blob_row(b, nodes) for b in view.blobs), "No blob is known."),
        _more(len(view.blobs), view.blob_count, "blobs"),
        "</body></html>",
    ]
    return "".join(parts).encode()


def render_standby(why: str, *, title: str = "p2preg cluster") -> bytes:
    """What a replica that stands by shows: why, and that the page is the serving one's."""
    return (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
        f'<p class="note">{_e(why)}. The cluster page is on the replica that serves '
        "(the one whose /readyz answers 200).</p></body></html>"
    ).encode()
