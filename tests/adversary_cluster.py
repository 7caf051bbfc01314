"""The one launcher of the adversary tests: a TLS cluster of real processes, and how they count.

Owns the setup every attack shares: the image pushed to a docker-registry
(behind a `FaultProxy` when a test shapes the upstream link), the tracker under
mutual TLS with its plain metrics port, honest nodes with certificates of the
cluster CA, and certificates of the same CA for the adversary (a member gone
bad). Pulls are checked byte for byte against the digest; upstream copies are
the blob GETs on their way to the seed registry. Must not hold an attack: what
an adversary sends, and what a test asserts, stay in the test.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.images import OciLayout
from harness.node import NodeProcess, metric_value, open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from tests.fixtures.cluster import Background
from tests.fixtures.faults import FaultProxy

SEED_NS = "seed.test"
MiB = 1 << 20
PULL_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Blob:
    repository: str
    digest: str
    size: int


@dataclass
class Cluster:
    ca: ClusterCA
    workdir: Path
    stack: ExitStack
    registry: Registry
    tracker: TrackerProcess
    layers: list[Blob]  # of the pushed image, in its manifest's order
    proxy: FaultProxy | None = None
    node_args: tuple[str, ...] = ()  # given to every node

    def node(self, name: str, *, stack: ExitStack | None = None) -> NodeProcess:
        """Start honest member `name` (its own certificate), stopped with `stack` (or the
        cluster); it fetches upstream through the proxy when there is one."""
        upstream = self.registry.url if self.proxy is None else self.proxy.url
        argv = ("--tracker", self.tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--peer-ssl-port", "0", *self.node_args)  # fmt: skip
        return (stack or self.stack).enter_context(open_node(
            self.workdir / name, [f"{SEED_NS}={upstream}"], args=argv, name=name,
            tls_dir=self.identity(name),
        ))  # fmt: skip

    def identity(self, name: str) -> Path:
        """A tls_dir for `name`, issued by the cluster CA: what a node or the adversary holds."""
        return self.ca.tls_dir(self.workdir / "certs" / name, "node", name)

    def tracker_metric(self, name: str, **labels: str) -> float:
        """One sample of the tracker's metrics; the family must be declared, so that a
        renamed metric cannot read as a 0."""
        assert self.tracker.metrics_url is not None
        text = httpx.get(f"{self.tracker.metrics_url}/metrics", timeout=10).text
        assert f"# HELP {name.removesuffix('_total')}" in text, name
        return metric_value(text, name, **labels)

    def upstream_copies(self, blob: Blob) -> int:
        """GETs of `blob` sent to the seed registry so far: counted at the proxy as they
        arrive when there is one, else from the registry's access log."""
        if self.proxy is not None:
            return sum(1 for e in self.proxy.log if e[1] == "GET" and e[2].endswith(blob.digest))
        self.registry.settle()
        return sum(
            1 for r in self.registry.served_requests()
            if r.method == "GET" and r.blob is not None and r.blob[1] == blob.digest
        )  # fmt: skip

    def tracker_answers(self) -> bool:
        assert self.tracker.metrics_url is not None
        ok = httpx.get(f"{self.tracker.metrics_url}/healthz", timeout=10).status_code == 200
        return ok and self.tracker.process.returncode is None


@contextmanager
def open_cluster(
    workdir: Path,
    registry: Registry,
    layout: OciLayout,
    repository: str,
    *,
    tracker_args: Sequence[str] = (),
    node_config: str = "",
    proxy: bool = False,
) -> Iterator[Cluster]:
    """Push `layout` as `repository` and start the tracker (its certificate names
    127.0.0.1) for a CA named after the repository's last part; no node yet.
    `node_config` is every node's TOML; `proxy` puts a `FaultProxy` before the registry."""
    image = push(layout, registry.host, repository)
    layers = [Blob(repository, b.digest, b.size) for b in image.manifests[0].layers]
    ca = ClusterCA.make(repository.rpartition("/")[2])
    node_args: tuple[str, ...] = ()
    if node_config:
        config = workdir / "node.toml"
        config.write_text(node_config)
        node_args = ("--config", str(config))
    with ExitStack() as stack:
        fault_proxy = stack.enter_context(FaultProxy(registry.url)) if proxy else None
        tracker = stack.enter_context(open_tracker(
            workdir / "tracker", args=tracker_args,
            tls_dir=ca.tls_dir(workdir / "certs" / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ))  # fmt: skip
        yield Cluster(ca, workdir, stack, registry, tracker, layers, fault_proxy, node_args)


def pull(node: NodeProcess, blob: Blob) -> float:
    """GET `blob` through `node`; it must be whole and hash to its digest. The seconds."""
    url = f"{node.url}/v2/{blob.repository}/blobs/{blob.digest}?ns={SEED_NS}"
    with httpx.Client(trust_env=False, timeout=PULL_TIMEOUT_S) as http:
        start = time.monotonic()
        r = http.get(url)
        took = time.monotonic() - start
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == blob.size
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == blob.digest
    return took


def pull_all(nodes: Sequence[NodeProcess], blobs: Sequence[Blob]) -> float:
    """Every node pulls every blob, all at once; seconds until all are verified (the
    first failure is raised)."""
    start = time.monotonic()
    pulls = [Background(functools.partial(pull, n, b)).start() for n in nodes for b in blobs]
    for p in pulls:
        p.result(PULL_TIMEOUT_S)
    return time.monotonic() - start
