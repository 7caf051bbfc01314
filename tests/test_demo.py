"""The demo (scripts/demo.py, the README's first command) run as a user runs it.

With the defaults the cluster runs over mutual TLS with a CA the demo makes:
containerd still pulls through every node, the tracker answered announces on
its HTTPS-only port (which takes nothing without a node certificate), blobs
moved between nodes over SSL torrents, and the seed registry sent the image
once. `--tls off` runs the same in plain text. Small layers and two nodes keep
it short; the numbers read are the demo's own summary, which comes from the
tracker's and nodes' metrics and the registry's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _demo(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PREG_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "400"  # one summary sentence per line, so the patterns below match
    argv = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--nodes", "2", "--layers-mib"]
    r = subprocess.run(
        [*argv, "2,3", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


def test_the_demo_runs_its_cluster_over_mutual_tls_by_default() -> None:
    out = _demo()
    assert "cluster over TLS" in out
    assert re.search(r"tracker https://127\.0\.0\.1:\d+", out)
    # Swarm news reached the tracker: as announces, or carried by control calls.
    swarm_news = _number(r"(\d+) announces and", out) + _number(
        r"(\d+) peers entered by control calls over mutual TLS", out
    )
    assert swarm_news > 0
    assert _number(r"\((\d+) connections refused\)", out) == 0
    assert _number(r"([\d.]+) MiB between nodes over SSL torrents", out) > 0
    assert _number(r"\((\d+) handshakes refused\)", out) == 0
    assert out.count(" yes ") == 2  # both containerd daemons unpacked the image
    assert _number(r"([\d.]+)x the image size", out) == 1.0


def test_the_demo_runs_in_plain_text_with_tls_off() -> None:
    out = _demo("--tls", "off")
    assert re.search(r"cluster in plain text \(--tls off\): tracker http://127\.0\.0\.1:\d+", out)
    assert _number(r"([\d.]+) MiB between nodes over plain BitTorrent", out) > 0
    assert out.count(" yes ") == 2
    assert _number(r"([\d.]+)x the image size", out) == 1.0
