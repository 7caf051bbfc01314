"""`p2preg registries-conf`: what podman/CRI-O and k3s/RKE2 are given, read back as they read it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from harness.procs import clean_env
from p2preg.core.config import ConfigError
from p2preg.node.config import Upstream
from p2preg.node.registries_conf import MARKER, node_address, render_k3s, render_podman

HUB = Upstream("docker.io", "https://registry-1.docker.io")
GHCR = Upstream("ghcr.io", "https://ghcr.io")
SEED = Upstream("seed.test", "http://127.0.0.1:5100")
LOCAL = Upstream("localhost:5000", "http://localhost:5000")


def _podman(*upstreams: Upstream, node: str = "http://127.0.0.1:5050") -> list[dict[str, object]]:
    text = render_podman(upstreams, node)
    assert text.startswith(MARKER)
    registries: list[dict[str, object]] = tomllib.loads(text)["registry"]
    return registries


def test_podman_one_registry_per_upstream_mirrored_at_node_slash_name() -> None:
    hub, ghcr, seed = _podman(HUB, GHCR, SEED)
    assert hub == {
        "prefix": "docker.io",
        "location": "docker.io",  # containers/image's name for Docker Hub, as its credentials are
        "mirror": [{"location": "127.0.0.1:5050/docker.io", "insecure": True}],
    }
    assert ghcr == {
        "prefix": "ghcr.io",
        "location": "ghcr.io",
        "mirror": [{"location": "127.0.0.1:5050/ghcr.io", "insecure": True}],
    }
    # The fallback is the node's own upstream, plain HTTP as the node reaches it.
    assert seed == {
        "prefix": "seed.test",
        "location": "127.0.0.1:5100",
        "insecure": True,
        "mirror": [{"location": "127.0.0.1:5050/seed.test", "insecure": True}],
    }


def test_podman_a_name_that_cannot_be_a_path_segment() -> None:
    # First: the node's default upstream serves a request naming none.
    (local, seed) = _podman(LOCAL, SEED, node="127.0.0.1:5050")
    assert local["mirror"] == [{"location": "127.0.0.1:5050", "insecure": True}]
    assert seed["mirror"] == [{"location": "127.0.0.1:5050/seed.test", "insecure": True}]
    with pytest.raises(ConfigError, match=r"'localhost:5000' cannot name itself in a mirror path"):
        render_podman([SEED, LOCAL], "127.0.0.1:5050")


def test_k3s_endpoints_the_node_then_the_upstream_unless_it_is_containerds_default() -> None:
    text = render_k3s([HUB, GHCR, SEED], "http://[::1]:5050")
    assert text.startswith(MARKER)
    assert yaml.safe_load(text) == {
        "mirrors": {
            "docker.io": {"endpoint": ["http://[::1]:5050"]},
            "ghcr.io": {"endpoint": ["http://[::1]:5050"]},
            "seed.test": {"endpoint": ["http://[::1]:5050", "http://127.0.0.1:5100"]},
        }
    }


@pytest.mark.parametrize("bad", ["https://127.0.0.1:5050", "http://h:1/v2", "http://", "ftp://h"])
def test_node_address_refuses_what_is_not_the_nodes_plain_http(bad: str) -> None:
    with pytest.raises(ConfigError, match="--node takes"):
        node_address(bad)
    assert node_address("http://127.0.0.1:5050/") == "127.0.0.1:5050"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", "registries-conf", *args],
        capture_output=True, text=True, timeout=60,
        env=clean_env(drop_prefixes=["P2PREG_"]),
    )


def test_cli_writes_keeps_a_foreign_file_and_says_why_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('listen = "0.0.0.0:5050"\nupstream = ["seed.test=http://127.0.0.1:5100"]\n')
    out = tmp_path / "registries.conf.d" / "50-p2preg.conf"
    done = _cli("--config", str(config), "--output", str(out))
    assert done.returncode == 0, done.stderr
    (seed,) = tomllib.loads(out.read_text())["registry"]
    assert seed["mirror"] == [{"location": "127.0.0.1:5050/seed.test", "insecure": True}]
    assert _cli("--config", str(config), "--output", str(out)).stdout.startswith("unchanged")
    k3s = _cli("--config", str(config), "--format", "k3s", "--node", "10.0.0.5:5050")
    assert yaml.safe_load(k3s.stdout)["mirrors"]["seed.test"]["endpoint"][0] == (
        "http://10.0.0.5:5050"
    )
    out.write_text("[[registry]]\nprefix = \"mine\"\n")
    kept = _cli("--config", str(config), "--output", str(out))
    assert kept.returncode == 1 and "p2preg did not write it" in kept.stderr
    assert out.read_text().startswith("[[registry]]")
    missing = _cli()
    assert missing.returncode == 2
    assert missing.stderr == (
        "p2preg registries-conf: give the node's --config (its upstreams are the registries)\n"
    )
