"""The peer upload cap between network namespaces: real processes on a lab bridge.

A seed registry, a tracker and two nodes, each in a namespace of its own
(harness/netns.py, 198.18.5.0/24, unshaped veths): node a takes a 3 MiB layer
from the registry and seeds it under a 256 KiB/s peer upload cap from its
config; node b then pulls the layer from a through the swarm. Both the blob
rate b sees and the bytes a's link sent, as the kernel counts them, stay at or
below 1.3 times the cap over the transfer (at least 10 s if the cap holds).
Only that upper bound is asserted.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from harness.images import build_image
from harness.netns import Host, open_lab, unavailable_reason
from harness.node import NodeProcess, open_node
from harness.procs import http_get, wait_until
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tracker import open_tracker

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
CAP = 256 * 1024
BOUND = 1.3


def test_the_peer_upload_cap_holds_between_network_namespaces(
    registry: Registry, tmp_path: Path
) -> None:
    reason = unavailable_reason()
    assert reason is None, reason
    layout = build_image(tmp_path / "image", seed="limits-netns", layer_sizes=(3 << 20,))
    image = push(layout, registry.host, "team/capped")
    layer = max(image.blobs, key=lambda b: b.size)
    with open_lab(f"p2plim-{os.getpid()}", subnet="198.18.5.0/24") as lab, ExitStack() as stack:
        hosts = {role: lab.add_host(role, ix) for role, ix in (("reg", 2), ("trk", 3),
                                                              ("a", 10), ("b", 11))}
        # The storage pushed on loopback, served from the lab.
        seed = stack.enter_context(open_registry(
            tmp_path / "seed", storage_dir=registry.storage_dir, host=hosts["reg"].addr,
            port=5000, netns=hosts["reg"].netns,
        ))
        tracker = stack.enter_context(open_tracker(
            tmp_path / "tracker", host=hosts["trk"].addr, port=6969, netns=hosts["trk"].netns,
            insecure=True,
        ))

        def node(host: Host, *extra: str) -> NodeProcess:
            args = ("--tracker", tracker.url, "--peer-host", host.addr, "--peer-port", "6881",
                    "--node-name", host.role, *extra)
            return stack.enter_context(open_node(
                tmp_path / host.role, [f"{SEED_NS}={seed.url}"], args=args, name=host.role,
                netns=host.netns, insecure=True,
            ))

        a = node(hosts["a"], "--peer-upload-limit-bytes-s", "256KiB")
        b = node(hosts["b"])
        path = f"/v2/{image.repository}/blobs/{layer.digest}?ns={SEED_NS}"
        assert http_get(a.url + path, netns=a.netns, timeout_s=60).status_code == 200
        wait_until(lambda: a.metric("p2preg_blobs_seeded") == 1, timeout_s=30,
                   what="a to seed the layer", process=a.process)

        sent_before = lab.link_bytes(hosts["a"])[1]
        started = time.monotonic()
        pulled = http_get(b.url + path, netns=b.netns, timeout_s=120)
        took = time.monotonic() - started
        sent = lab.link_bytes(hosts["a"])[1] - sent_before

        assert pulled.status_code == 200 and len(pulled.content) == layer.size
        assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
        assert layer.size / took <= BOUND * CAP, f"{layer.size / took / CAP:.2f} times the cap"
        assert sent / took <= BOUND * CAP, f"a's link sent {sent / took / CAP:.2f} times the cap"
