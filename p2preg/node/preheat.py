"""`p2preg preheat IMAGE…`: put every blob of an image into the swarm before a deploy.

Owns resolving images for the chosen platforms through a node (the facade
containerd uses, `?ns=` and all), asking each given node to bring every blob
into its store and the swarm (`POST /_p2preg/preheat/…`, see p2preg/node/admin.py:
no blob byte travels to this command), and then confirming with the tracker
that every swarmed blob has metainfo and at least `--seeders` seeders. It shows
a progress bar, ends with a summary table, and its exit status says whether
the cluster is ready. Image references and platform choice are sans-IO
functions in imagerefs.py; where each blob comes from is the nodes' business,
and this command must not fetch a blob's bytes itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from p2preg.core import errors as tracker_errors
from p2preg.core.config import ConfigError
from p2preg.core.digest import Digest, DigestError
from p2preg.core.tls import ReloadingTLS
from p2preg.node.admin import PREHEAT_PREFIX, STATUS_PATH
from p2preg.node.adminauth import ADMIN_TOKEN_ENV, admin_headers, read_admin_token
from p2preg.node.imagerefs import (
    ImageRef,
    Platform,
    PreheatError,
    host_platform,
    parse_image,
    select_manifests,
)
from p2preg.node.manifest import DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, OCI_INDEX, OCI_MANIFEST
from p2preg.node.operator_tls import add_tls_argument, needs_tls_dir, read_tls, tracker_urls
from p2preg.node.pincmd import pin_everywhere
from tracker.client import TrackerClient, open_tracker_client

MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# A scrape carries at most this many info-hashes (the tracker's default cap).
SCRAPE_BATCH = 64
CONFIRM_POLL_S = 0.5
TOKEN_ENV = ("P2PREG_TRACKER_TOKEN", "P2PREG_TOKEN")

# -- the run ---------------------------------------------------------------------------


@dataclass
class BlobPlan:
    """One blob to preheat, and what the nodes and the tracker said about it."""

    digest: str
    size: int
    kind: str  # "config" or "layer"
    registry: str
    repository: str
    images: set[str] = field(default_factory=set)
    # node URL → "peers" / "upstream" / "store", or "error: …"
    fetched: dict[str, str] = field(default_factory=dict)
    seeding_on: int = 0
    # Some node seeds it, or it is not below a node's p2p_min_bytes: it must be in
    # the swarm. Otherwise nodes fetch it from upstream by design.
    swarmed: bool = False
    info_hash: str = ""  # hex, once the tracker has metainfo
    seeders: int = 0

    @property
    def metainfo(self) -> bool:
        return bool(self.info_hash)

    def failures(self) -> list[str]:
        return [f"{n}: {s}" for n, s in self.fetched.items() if s.startswith("error")]


def _manifest_url(node: str, image: ImageRef, reference: str) -> str:
    return f"{node}/v2/{image.repository}/manifests/{reference}?ns={quote(image.registry)}"


async def _get_manifest(
    http: httpx.AsyncClient, node: str, image: ImageRef, reference: str
) -> tuple[str, dict[str, Any]]:
    url = _manifest_url(node, image, reference)
    try:
        r = await http.get(url, headers={"Accept": MANIFEST_ACCEPT})
    except httpx.HTTPError as e:
        raise PreheatError(f"node {node}: {e!r}") from None
    if r.status_code != 200:
        raise PreheatError(f"{image}: node {node} answered {r.status_code}: {r.text[:300]}")
    try:
        doc = json.loads(r.content)
    except ValueError:
        raise PreheatError(f"{image}: the manifest {reference} is not JSON") from None
    if not isinstance(doc, dict):
        raise PreheatError(f"{image}: the manifest {reference} is not a JSON object")
    media_type = r.headers.get("Content-Type", "").split(";")[0] or str(doc.get("mediaType", ""))
    return media_type, doc


async def resolve(
    http: httpx.AsyncClient,
    node: str,
    images: Sequence[ImageRef],
    platforms: Sequence[Platform] | None,
) -> dict[str, BlobPlan]:
    """Every blob (configs and layers) of `images` for `platforms`, by digest."""
    blobs: dict[str, BlobPlan] = {}
    for image in images:
        media_type, doc = await _get_manifest(http, node, image, image.reference)
        if media_type in INDEX_TYPES or "manifests" in doc:
            digests = select_manifests(doc, platforms)
            if not digests:
                wanted = ", ".join(map(str, platforms or ())) or "any"
                raise PreheatError(f"{image} has no manifest for platform {wanted}")
            manifests = [(await _get_manifest(http, node, image, d))[1] for d in digests]
        else:
            manifests = [doc]
        for manifest in manifests:
            config, layers = manifest.get("config"), manifest.get("layers") or []
            for kind, desc in [("config", config), *(("layer", d) for d in layers)]:
                if not isinstance(desc, dict):
                    continue
                try:
                    digest = str(Digest.parse(str(desc.get("digest"))))
                except DigestError:
                    raise PreheatError(f"{image}: a descriptor has a bad digest") from None
                plan = blobs.get(digest)
                if plan is None:
                    plan = blobs[digest] = BlobPlan(
                        digest,
                        int(desc.get("size") or 0),
                        kind,
                        image.registry,
                        image.repository,
                    )
                plan.images.add(str(image))
    return blobs


async def _fetch_on(
    http: httpx.AsyncClient,
    node: str,
    plan: BlobPlan,
    limit: trio.Semaphore,
    progress: Progress,
    task: Any,
    admin: str,
) -> None:
    url = (
        f"{node}{PREHEAT_PREFIX}{plan.repository}/blobs/{plan.digest}"
        f"?ns={quote(plan.registry)}"
    )
    async with limit:
        try:
            r = await http.post(url, headers=admin_headers(admin))
            doc = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as e:
            plan.fetched[node] = f"error: {e!r}"
        else:
            if not isinstance(doc, dict):
                plan.fetched[node] = f"error: {r.status_code} {r.text[:200]}"
            else:  # a pin made just before says where the blob came from
                plan.fetched.setdefault(node, str(doc.get("source", "?")))
                min_bytes = doc.get("p2p_min_bytes")
                if doc.get("seeding"):
                    plan.seeding_on += 1
                if doc.get("seeding") or (isinstance(min_bytes, int) and plan.size >= min_bytes):
                    plan.swarmed = True
    progress.advance(task, plan.size)


async def _trackers_of(http: httpx.AsyncClient, node: str, admin: str) -> list[str] | None:
    """The trackers the node uses, from its full status (every replica, in its order)."""
    try:
        doc = (await http.get(node + STATUS_PATH, headers=admin_headers(admin))).json()
    except (httpx.HTTPError, ValueError):
        return None
    swarm = doc.get("swarm") if isinstance(doc, dict) else None
    if not isinstance(swarm, dict):
        return None
    urls = swarm.get("trackers")
    if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        return urls
    url = swarm.get("tracker")  # a node of an earlier version names one
    return [url] if isinstance(url, str) else None


async def confirm(
    tracker: TrackerClient, blobs: Sequence[BlobPlan], seeders: int, timeout_s: float
) -> bool:
    """Wait until every swarmed blob has metainfo and `seeders` seeders; True if so."""
    deadline = trio.current_time() + timeout_s
    while True:
        waiting = [p for p in blobs if not (p.metainfo and p.seeders >= seeders)]
        for plan in waiting:
            if not plan.metainfo:
                record = await tracker.lookup_metainfo(Digest.parse(plan.digest))
                if record is not None and record.info_hashes:
                    plan.info_hash = record.info_hashes[0].hex()
        hashes = {bytes.fromhex(p.info_hash): p for p in waiting if p.metainfo}
        keys = list(hashes)
        for i in range(0, len(keys), SCRAPE_BATCH):
            stats = await tracker.scrape(keys[i : i + SCRAPE_BATCH])
            for ih, s in stats.items():
                if ih in hashes:
                    hashes[ih].seeders = s.complete
        if all(p.metainfo and p.seeders >= seeders for p in blobs):
            return True
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(CONFIRM_POLL_S)


@dataclass(frozen=True)
class Outcome:
    ready: bool
    blobs: list[BlobPlan]
    seconds: float
    problem: str = ""


async def preheat(
    images: Sequence[ImageRef],
    nodes: Sequence[str],
    *,
    platforms: Sequence[Platform] | None,
    seeders: int,
    tracker_urls: Sequence[str] | None,
    token: str | None,
    tls: ReloadingTLS | None,
    admin_token: str,
    timeout_s: float,
    confirm_timeout_s: float,
    per_node: int,
    console: Console,
    pin: bool = False,
) -> Outcome:
    start = time.monotonic()
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        plans = await resolve(http, nodes[0], images, platforms)
        if pin:  # first: a pin that does not fit is refused before a byte moves
            pinned = await pin_everywhere(http, nodes, images, platforms, admin_token)
            for node, sources in pinned.items():
                for digest, source in sources.items():
                    if digest in plans:
                        plans[digest].fetched[node] = source
        blobs = sorted(plans.values(), key=lambda p: -p.size)
        total = sum(p.size for p in blobs) * len(nodes)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(
                f"{len(blobs)} blobs on {len(nodes)} node(s)", total=total or None
            )
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    limit = trio.Semaphore(per_node)
                    for plan in blobs:
                        nursery.start_soon(
                            _fetch_on, http, node, plan, limit, progress, task, admin_token
                        )
        failed = [p for p in blobs if p.failures()]
        if failed:
            return Outcome(False, blobs, time.monotonic() - start, "some fetches failed")
        trackers = tracker_urls or await _trackers_of(http, nodes[0], admin_token)
        swarmed = [p for p in blobs if p.swarmed]
        if not trackers:
            problem = "the nodes have no tracker: blobs are in their stores, not in a swarm"
            return Outcome(False, blobs, time.monotonic() - start, problem)
        if tls is None and trackers[0].startswith("https://"):
            return Outcome(False, blobs, time.monotonic() - start, needs_tls_dir(trackers[0]))
        try:
            if tls is None:
                client = TrackerClient(trackers, node="p2preg-preheat", token=token, http=http)
                ready = await confirm(client, swarmed, seeders, confirm_timeout_s)
            else:
                name = tls.identity.name
                async with open_tracker_client(trackers, node=name, tls=tls) as client:
                    ready = await confirm(client, swarmed, seeders, confirm_timeout_s)
        except tracker_errors.TrackerError as e:
            return Outcome(False, blobs, time.monotonic() - start, f"tracker: {e}")
        problem = "" if ready else f"not every blob reached {seeders} seeder(s) in time"
        return Outcome(ready, blobs, time.monotonic() - start, problem)


# -- presentation ------------------------------------------------------------------------


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary_table(outcome: Outcome, seeders: int) -> Table:
    table = Table(title="preheat", title_justify="left")
    for name, justify in (
        ("blob", "left"), ("type", "left"), ("size", "right"), ("fetched on nodes", "left"),
        ("metainfo", "center"), ("seeders", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in outcome.blobs:
        sources: dict[str, int] = {}
        for s in p.fetched.values():
            key = "error" if s.startswith("error") else s
            sources[key] = sources.get(key, 0) + 1
        fetched = ", ".join(f"{k} {v}" for k, v in sorted(sources.items()))
        if p.swarmed:
            meta = "yes" if p.metainfo else "[red]no[/red]"
            count = str(p.seeders) if p.seeders >= seeders else f"[red]{p.seeders}[/red]"
        else:
            meta, count = "—", "direct"
        table.add_row(p.digest[:19], p.kind, human_size(p.size), fetched, meta, count)
    return table


def read_token(args: argparse.Namespace) -> str | None:
    path = getattr(args, "token_file", None)
    if path is not None:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --token-file {path}: {e.strerror}") from None
        return token or None
    return next((os.environ[k] for k in TOKEN_ENV if os.environ.get(k)), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from p2preg.node.containerd_config import default_node_url

    default_node = default_node_url()
    p.add_argument("images", nargs="+", metavar="IMAGE", help="e.g. docker.io/library/nginx:1.27")
    p.add_argument(
        "--node",
        action="append",
        metavar="URL",
        help=f"a node to fetch every blob (repeatable; default {default_node})",
    )
    p.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="platforms to preheat (repeatable, or `all`; default this machine's)",
    )
    p.add_argument(
        "--seeders", type=int, metavar="K", help="done when every blob has K seeders (1)"
    )
    p.add_argument(
        "--tracker",
        metavar="URL",
        action="append",
        help="the tracker (repeatable: one cluster's replicas; default: the first node's)",
    )
    p.add_argument(
        "--token-file", metavar="FILE", help="cluster token (default: $P2PREG_TRACKER_TOKEN)"
    )
    add_tls_argument(p)
    p.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help=f"the nodes' admin token (default ${ADMIN_TOKEN_ENV}, else "
        "/var/lib/p2preg/admin.token; nodes given one admin_token_file share it)",
    )
    p.add_argument(
        "--timeout-s", type=float, metavar="SECONDS", help="longest fetch of one blob (3600)"
    )
    p.add_argument(
        "--confirm-timeout-s",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the tracker to count the seeders (60)",
    )
    p.add_argument("--pin", action="store_true",
                   help="also pin the images on every --node: never evicted (`p2preg unpin`)")
    p.add_argument("--per-node", type=int, metavar="N", help="blobs fetched at once per node (4)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from p2preg.node.containerd_config import default_node_url

    nodes = [n.rstrip("/") for n in getattr(args, "node", None) or [default_node_url()]]
    seeders: int = getattr(args, "seeders", 1)
    if seeders < 1:
        raise ConfigError("--seeders must be ≥ 1")
    given = getattr(args, "platform", None) or [str(host_platform())]
    platforms = None if "all" in given else [Platform.parse(p) for p in given]
    as_json = getattr(args, "json", False)
    console = Console(stderr=True)
    if seeders > len(nodes):
        console.print(
            f"[yellow]asking {len(nodes)} node(s) for {seeders} seeders: the others must "
            "already hold the blobs (or be preheated by another run)[/yellow]"
        )
    admin_token = read_admin_token(getattr(args, "admin_token_file", None))
    if admin_token is None:
        raise ConfigError(
            "preheat needs the nodes' admin token: --admin-token-file FILE "
            f"(or ${ADMIN_TOKEN_ENV}); a node writes <data_dir>/admin.token at start"
        )
    trackers = tracker_urls(args)
    tls = read_tls(args, trackers)
    try:
        images = [parse_image(i) for i in args.images]
        run_preheat = partial(
            preheat, images, nodes,
            platforms=platforms,
            seeders=seeders,
            tracker_urls=trackers,
            token=None if tls is not None else read_token(args),
            tls=tls,
            admin_token=admin_token,
            timeout_s=getattr(args, "timeout_s", 3600.0),
            confirm_timeout_s=getattr(args, "confirm_timeout_s", 60.0),
            per_node=max(1, getattr(args, "per_node", 4)),
            console=console,
            pin=getattr(args, "pin", False),
        )
        outcome = trio.run(run_preheat)
    except PreheatError as e:
        print(f"p2preg preheat: {e}", file=sys.stderr)
        return 1
    if as_json:
        doc = {
            "ready": outcome.ready,
            "problem": outcome.problem,
            "seconds": round(outcome.seconds, 3),
            "blobs": [
                {**asdict(p), "images": sorted(p.images), "metainfo": p.metainfo}
                for p in outcome.blobs
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        out = Console()
        out.print(summary_table(outcome, seeders))
        swarmed = [p for p in outcome.blobs if p.swarmed]
        direct = [p for p in outcome.blobs if not p.swarmed]
        out.print(
            f"{len(outcome.blobs)} blobs, {human_size(sum(p.size for p in outcome.blobs))}, "
            f"on {len(nodes)} node(s) in {outcome.seconds:.1f} s; "
            f"{len(swarmed)} in the swarm"
        )
        if direct:
            out.print(
                f"{len(direct)} blob(s), {human_size(sum(p.size for p in direct))}, are below the "
                "nodes' p2p_min_bytes: each node that pulls them fetches them from upstream"
            )
        for p in outcome.blobs:
            for failure in p.failures():
                out.print(f"[red]{p.digest[:19]}[/red] {failure}")
        if outcome.ready:
            out.print(f"[green]ready[/green]: every swarmed blob has metainfo and ≥ {seeders} "
                      "seeder(s)")
        else:
            out.print(f"[red]not ready[/red]: {outcome.problem}")
    return 0 if outcome.ready else 1
