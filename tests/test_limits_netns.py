"""The peer caps between network namespaces: real processes on a lab bridge.

A seed registry, a tracker and two nodes, each in a namespace of its own
(harness/netns.py, 198.18.5.0/24, unshaped veths): node a takes a 3 MiB layer
from the registry and seeds it under a 256 KiB/s peer upload cap from its
config; node b then pulls the layer from a through the swarm. Then `p2preg
limits set`, run in each node's namespace, lifts a's cap and gives b a
256 KiB/s peer download cap, and b pulls a second layer. Both the blob rate b
sees and the bytes a's link sent, as the kernel
counts them, stay at or below 1.3 times the cap over each transfer (at least
10 s if the cap holds). Only that upper bound is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from harness.images import build_image
from harness.netns import Host, open_lab, unavailable_reason
from harness.node import NodeProcess, open_node
from harness.nsenter import netns_argv
from harness.procs import clean_env, http_get, wait_until
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tracker import open_tracker

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
CAP = 256 * 1024
BOUND = 1.3


def set_limits(node: NodeProcess, *args: str) -> None:
    """`p2preg limits set …` as an operator on that node's host runs it."""
    argv = [sys.executable, "-m", "p2preg", "limits", "set", *args, "--node", node.url,
            "--admin-token-file", str(node.admin_token_file)]
    done = subprocess.run(netns_argv(argv, node.netns), capture_output=True, text=True,
                          timeout=60, env=clean_env(drop_prefixes=["P2PREG_"]))
    assert done.returncode == 0, done.stderr


def test_the_peer_caps_hold_between_network_namespaces(
    registry: Registry, tmp_path: Path
) -> None:
    reason = unavailable_reason()
    assert reason is None, reason
    layout = build_image(tmp_path / "image", seed="limits-netns", layer_sizes=(3 << 20, 3 << 20))
    image = push(layout, registry.host, "team/capped")
    layers = image.manifests[0].layers
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

        def transfer(digest: str, size: int) -> tuple[float, tuple[int, int]]:
            """b pulls `digest` from a: seconds, and a's link (received, sent) meanwhile."""
            path = f"/v2/{image.repository}/blobs/{digest}?ns={SEED_NS}"
            seeded = a.metric("p2preg_blobs_seeded")
            assert http_get(a.url + path, netns=a.netns, timeout_s=60).status_code == 200
            wait_until(lambda: a.metric("p2preg_blobs_seeded") > seeded, timeout_s=30,
                       what="a to seed the layer", process=a.process)
            before = lab.link_bytes(hosts["a"])
            started = time.monotonic()
            pulled = http_get(b.url + path, netns=b.netns, timeout_s=120)
            took = time.monotonic() - started
            after = lab.link_bytes(hosts["a"])
            assert pulled.status_code == 200 and len(pulled.content) == size
            return took, (after[0] - before[0], after[1] - before[1])

        took, (_, sent) = transfer(layers[0].digest, layers[0].size)
        assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
        assert layers[0].size / took <= BOUND * CAP, f"{layers[0].size / took / CAP:.2f} x cap"
        assert sent / took <= BOUND * CAP, f"a's link sent {sent / took / CAP:.2f} times the cap"

        set_limits(a, "--peer-upload", "0")
        set_limits(b, "--peer-download", "256KiB")
        took, (_, sent) = transfer(layers[1].digest, layers[1].size)
        assert b.metric("p2preg_blob_fetches_total", source="peers") == 2
        assert layers[1].size / took <= BOUND * CAP, f"{layers[1].size / took / CAP:.2f} x cap"
        # b's cap governs what it reads; a can send only what b's TCP window lets through.
        assert sent / took <= BOUND * CAP, f"a's link sent {sent / took / CAP:.2f} times the cap"
