"""What the adversary tests share: a TLS cluster of real processes, and how they count.

A docker-registry holding one image (one layer above the node's p2p threshold),
the tracker under mutual TLS with its plain metrics port, honest nodes with
certificates from the cluster CA, and a certificate of the same CA for the
adversary (a member gone bad). Pulls are checked byte for byte against the
digest; upstream copies are the seed registry's own count of blob GETs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.node import NodeProcess, metric_value, open_node
from harness.registry import Registry
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker

SEED_NS = "seed.test"
MiB = 1 << 20


@dataclass(frozen=True)
class Blob:
    repository: str
    digest: str
    size: int


@dataclass
class Cluster:
    ca: ClusterCA
    certs: Path
    tracker: TrackerProcess
    registry: Registry
    blob: Blob
    workdir: Path

    def node(
        self, stack: ExitStack, name: str, args: Sequence[str] = ()
    ) -> NodeProcess:
        """Start an honest member `name` (its own certificate) in `stack`."""
        tls = self.ca.tls_dir(self.certs / name, "node", name)
        argv = ("--tracker", self.tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--peer-ssl-port", "0", *args)
        return stack.enter_context(open_node(
            self.workdir / name, [f"{SEED_NS}={self.registry.url}"], args=argv, name=name,
            tls_dir=tls,
        ))

    def identity(self, name: str) -> Path:
        """A tls_dir for `name`, issued by the cluster CA: what the adversary holds."""
        return self.ca.tls_dir(self.certs / name, "node", name)

    def tracker_metric(self, name: str, **labels: str) -> float:
        assert self.tracker.metrics_url is not None
        text = httpx.get(f"{self.tracker.metrics_url}/metrics", timeout=10).text
        return metric_value(text, name, **labels)

    def upstream_copies(self, blob: Blob | None = None) -> int:
        """Blob GETs of `blob` (by default the cluster's) the seed registry served."""
        digest = (blob or self.blob).digest
        self.registry.settle()
        return sum(
            1 for r in self.registry.served_requests()
            if r.method == "GET" and r.blob is not None and r.blob[1] == digest
        )

    def tracker_answers(self) -> bool:
        assert self.tracker.metrics_url is not None
        ok = httpx.get(f"{self.tracker.metrics_url}/healthz", timeout=10).status_code == 200
        return ok and self.tracker.process.returncode is None


def start_tracker(
    stack: ExitStack, workdir: Path, ca: ClusterCA, args: Sequence[str] = ()
) -> TrackerProcess:
    return stack.enter_context(open_tracker(
        workdir / "tracker", args=list(args),
        tls_dir=ca.tls_dir(workdir / "certs" / "tracker", "tracker", "t", ips=["127.0.0.1"]),
    ))


def pull_verified(node: NodeProcess, blob: Blob) -> None:
    """GET the blob through `node`; it must be whole and hash to its digest."""
    url = f"{node.url}/v2/{blob.repository}/blobs/{blob.digest}?ns={SEED_NS}"
    r = httpx.get(url, timeout=180)
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == blob.size
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == blob.digest
