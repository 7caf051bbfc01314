"""Many clients ask one node for one big blob at the same moment.

A cold node (a real process) in front of the real docker-registry gets
`CLIENTS` concurrent GETs for a `BLOB_MIB` MiB layer: the seed registry must
send it once (single flight), every client must get the right bytes, and the
node's peak RSS must stay within its resident size before the burst plus one
chunk per stream it allows (`max_blob_streams` times `stream_chunk_bytes`).

The issue asks for 200 clients and 1 GB; on the shared 2-core machine that is
200 GB of loopback traffic, so the default here is 100 clients and 32 MiB
(3.2 GB). `FAULTS_LOAD_CLIENTS` and `FAULTS_LOAD_BLOB_MIB` set the full size.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.images import build_image, push
from tests.fixtures.node import open_node
from tests.fixtures.registry import Registry
from tests.fixtures.reliability import Tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
SEED_NS = "seed.test"
CLIENTS = int(os.environ.get("FAULTS_LOAD_CLIENTS", "100"))
BLOB_MIB = int(os.environ.get("FAULTS_LOAD_BLOB_MIB", "32"))
MAX_STREAMS = 32
CHUNK = 1 * MiB
COMMAND = ".venv/bin/pytest -q tests/test_faults_load.py"


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_concurrent_clients_of_one_big_blob_cost_one_download_and_bounded_memory(
    registry: Registry, tmp_path: Path
) -> None:
    tally = Tally("faults-load", COMMAND)
    layout: Any = build_image(tmp_path / "layout", seed="load", layer_sizes=(BLOB_MIB * MiB,))
    image = push(layout, registry.host, "load/big")
    layer = image.manifests[0].layers[0]
    small = image.manifests[0].config
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"max_blob_streams = {MAX_STREAMS}\nstream_chunk_bytes = {CHUNK}\n")
    with open_node(
        tmp_path / "node", [f"{SEED_NS}={registry.url}"], args=("--config", str(cfg))
    ) as node:
        base = f"{node.url}/v2/{image.repository}/blobs"
        with httpx.Client(trust_env=False, timeout=60) as http:  # warm the code paths
            assert http.get(f"{base}/{small.digest}").status_code == 200
        pid = node.process.pid
        base_kib = _vm_kib(pid, "VmRSS")
        start = threading.Barrier(CLIENTS)

        def client(_: int) -> str:
            h = hashlib.sha256()
            with httpx.Client(trust_env=False, timeout=600) as c:
                start.wait(timeout=60)
                with c.stream("GET", f"{base}/{layer.digest}") as r:
                    if r.status_code != 200:
                        return f"status {r.status_code}"
                    for chunk in r.iter_raw(1 << 20):
                        h.update(chunk)
            return "sha256:" + h.hexdigest()

        tally.pulls_attempted = CLIENTS
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            got = list(pool.map(client, range(CLIENTS)))
        ok = sum(1 for g in got if g == layer.digest)
        tally.pulls_completed = ok
        tally.bytes_verified = ok * layer.size
        peak_kib = _vm_kib(pid, "VmHWM")
        bound_kib = base_kib + MAX_STREAMS * CHUNK // 1024
        registry.settle()
        sent = registry.blob_bytes_sent().get(layer.digest, 0)
        tally.faults_injected[f"{CLIENTS} concurrent GETs of one {BLOB_MIB} MiB blob"] = 1
        tally.extra.update(
            clients=CLIENTS,
            blob_bytes=layer.size,
            base_rss_kib=base_kib,
            peak_rss_kib=peak_kib,
            bound_kib=bound_kib,
            upstream_bytes=sent,
            max_blob_streams=MAX_STREAMS,
            stream_chunk_bytes=CHUNK,
        )
        tally.write()
        assert got == [layer.digest] * CLIENTS, sorted(set(got))
        assert sent <= 1.05 * layer.size  # one download for everyone
        assert node.metric("p2preg_blob_fetch_joins_total") >= 1
        assert peak_kib <= bound_kib, (base_kib, peak_kib, bound_kib)
