"""Tracker replicas under a containerd fan-out: the serving replica killed mid-pull.

Real processes on loopback: one redis-server, three `p2preg tracker --store`
replicas on it (term 2 s), the seed registry with an image of four 3 MiB
layers, and four nodes, each given all three trackers (`--tracker` repeated)
and each with its own containerd pulling the image at once. As soon as the
serving replica counts a seeder of one layer and all four nodes in its swarm,
it is killed (SIGKILL by pid), while the image's other layers are still
waiting for, or crossing, upstream (the tracker queues an image's upstream
fetches).

What is asserted, and why:
- every pull completes: each containerd has the image's whole layer stack
  unpacked (containerd checks every layer against the config's diff_ids);
- a standby took the term: exactly one surviving replica answers `/readyz` 200,
  and its `p2preg_tracker_terms_total` is 1; how long that took is printed;
- no node fell back for a tracker that did not answer
  (`p2preg_fallbacks_total{reason="tracker"}`): a node whose lease wait the
  kill cut finds the other replicas standing by for the dead one's term
  (`standing_by`) and asks again until one serves; and the nodes whose client
  moved on announced their downloads and new seeds again (its log says so), so
  a seeder whose last announce died with the replica is found by the next;
- upstream, counted from the seed registry's own log: every layer crossed
  exactly once, as a whole copy (the issue's 1.05x of four nodes' one copy).
  Each node takes at most 2 MiB/s from upstream, so the image's four layers
  cross one after another over ~6 s and the kill lands while some still wait
  or cross, whatever the machine's load. A seeder's announce that died with the
  replica is not lost: a node's announces go through its relay on the control
  connection, whose client moves to the next replica at the first failed
  request and announces the node's downloads and seeds again
  (p2preg/node/takeover.py). The copies and the fallbacks are printed.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.procs import wait_until
from harness.redis import start_redis
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess
from tests.replica_helpers import metric, ready, replicas, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
MiB = 1024 * 1024
# Above the node's p2p threshold (1 MiB): every layer goes through the swarm.
LAYERS = (3 * MiB, 3 * MiB, 3 * MiB, 3 * MiB)
NODES = 4
# Each node's cap on upstream: a 3 MiB layer takes 1.5 s, so the kill lands mid-pull.
UPSTREAM_CAP = "2MiB"
TOKEN = "fanout-token"
PASSWORD = "fanout-store-password"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("fanout") / "layout", seed="fanout",
                       layer_sizes=LAYERS)  # fmt: skip


def _joined(t: TrackerProcess) -> set[str]:
    """The digests whose swarm, on the serving replica now, has a seeder and every node."""
    r = httpx.get(f"{t.url}/v1/status?limit=1000", timeout=5,
                  headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    r.raise_for_status()
    return {
        row["digest"]
        for row in r.json()["busiest"]
        if int(row["seeders"]) > 0 and int(row["seeders"]) + int(row["leechers"]) == NODES
    }


def _nodes(
    stack: ExitStack, workdir: Path, registry: Registry, trackers: list[TrackerProcess]
) -> list[NodeProcess]:
    out = []
    for i in range(NODES):
        args = ["--peer-host", "127.0.0.1", "--peer-port", "0", "--node-name", f"n{i}",
                "--upstream-download-limit-bytes-s", UPSTREAM_CAP]  # fmt: skip
        for t in trackers:
            args += ["--tracker", t.url]
        out.append(stack.enter_context(open_node(
            workdir / f"n{i}", [f"{SEED_NS}={registry.url}"], args=args, name=f"n{i}",
            env={"P2PREG_TRACKER_TOKEN": TOKEN},
        )))  # fmt: skip
    return out


def _gets(registry: Registry, image: PushedImage) -> dict[str, list[int]]:
    """Per layer, the body bytes of each GET of its blob the seed registry served."""
    registry.settle()
    out: dict[str, list[int]] = {b.digest: [] for b in image.manifests[0].layers}
    for req in registry.served_requests():
        blob = req.blob
        if req.method == "GET" and blob is not None and blob[1] in out and req.written > 0:
            out[blob[1]].append(req.written)
    return out


def test_the_serving_replica_killed_mid_fanout_every_pull_completes_and_a_standby_serves(
    registry: Registry,
    layout: Any,
    tmp_path: Path,
    containerd_factory: Callable[..., Containerd],
) -> None:
    image = push(layout, registry.host, "fanout/app")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    with ExitStack() as stack:
        server = stack.enter_context(start_redis(tmp_path / "redis", password=PASSWORD))
        trackers = stack.enter_context(
            replicas(tmp_path, server.url(), 3, token=TOKEN, password=PASSWORD)
        )
        first = serving(trackers)
        nodes = _nodes(stack, tmp_path, registry, trackers)
        daemons: list[Containerd] = [containerd_factory() for _ in nodes]
        hosts = [tmp_path / f"hosts{i}" for i in range(NODES)]
        for node, h in zip(nodes, hosts, strict=True):
            write_hosts_toml(h, SEED_NS, node.url)

        with concurrent.futures.ThreadPoolExecutor(NODES) as pool:
            pulls = [pool.submit(d.pull, ref, h) for d, h in zip(daemons, hosts, strict=True)]
            before: set[str] = set()

            def one_joined() -> bool:
                before.update(_joined(first))
                return bool(before)

            wait_until(one_joined, timeout_s=120, what="a layer's swarm to hold every node",
                       interval_s=0.05)  # fmt: skip
            os.kill(first.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            first.process.stop()  # reaps it
            took_over = serving(trackers, timeout_s=60)
            print(f"a standby served {time.monotonic() - killed_at:.1f} s after the kill")
            for pull in pulls:
                pull.result(timeout=300)

        for daemon in daemons:
            assert daemon.is_unpacked(image.manifests[0])
        survivors = [t for t in trackers if t.process.returncode is None]
        assert len(survivors) == 2 and [t for t in survivors if ready(t)] == [took_over]
        assert metric(took_over, "p2preg_tracker_terms_total") == 1
        gets = _gets(registry, image)
        fallbacks = sum(n.metric("p2preg_fallbacks_total", reason="tracker") for n in nodes)
        print("fallbacks:", [line for n in nodes for line in n.metrics().splitlines()
                             if line.startswith("p2preg_fallbacks_total")])
        print("layers joined by every node before the kill:", sorted(d[7:19] for d in before))
        print("upstream copies per layer:", {d[7:19]: len(g) for d, g in gets.items()},
              "tracker fallbacks:", fallbacks)  # fmt: skip
        assert before, "no layer's swarm held every node before the kill"
        assert len(before) < len(gets), "every layer had spread before the kill"
        for digest, got in gets.items():
            assert len(got) == 1, (digest, gets)
        sizes = {b.digest: b.size for b in image.manifests[0].layers}
        for digest, got in gets.items():
            assert all(n == sizes[digest] for n in got), (digest, got)  # whole copies only
        # Nodes waited the takeover out: none fell back for want of a tracker.
        assert fallbacks == 0
        # Each node's control client moved on from the dead replica, and the node
        # announced its downloads and new seeds again (p2preg/node/takeover.py).
        moved = [n for n in nodes if "tracker moved: announced" in n.process.log_path.read_text()]
        assert moved, "no node announced again after its tracker moved"
