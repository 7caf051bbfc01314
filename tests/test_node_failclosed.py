"""A node fails closed (p2preg/node/config.py): no plain text beyond loopback by accident.

Without a tls_dir, a node whose peer port would serve beyond loopback, or
whose tracker link is plain HTTP to another host, refuses to
start in one line (exit 2) unless told `insecure`; with a tls_dir the tracker
link must still not be plain HTTP beyond loopback, no token rides along, and
the certificate names the node.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.procs import clean_env
from harness.tlscerts import ClusterCA
from p2preg.core.config import ConfigError, load
from p2preg.node.config import NodeConfig

UPSTREAM = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ClusterCA.make("fc").tls_dir(tmp_path_factory.mktemp("fc") / "tls", "node", "n1")


def _loaded(**cli: Any) -> NodeConfig:
    return load(NodeConfig, cli={"upstream": [UPSTREAM], **cli})


def _config(**cli: Any) -> NodeConfig:
    """Loaded and checked as the node does at start."""
    config = _loaded(**cli)
    config.check_serving()
    return config


LOOPBACK_TRACKER = {"tracker": "http://127.0.0.1:6969", "peer_host": "127.0.0.1"}


@pytest.mark.parametrize(
    ("cli", "why"),
    [
        ({**LOOPBACK_TRACKER, "peer_host": "0.0.0.0"}, "peer_host 0.0.0.0 serves the peer wire"),
        ({**LOOPBACK_TRACKER, "peer_host": "198.18.0.2"}, "peer_host 198.18.0.2 serves"),
        (
            {**LOOPBACK_TRACKER, "tracker": "http://198.18.0.1:6969"},
            "tracker http://198.18.0.1:6969 is plain HTTP beyond loopback",
        ),
        # The default peer_host is 0.0.0.0: a node with a tracker must choose.
        ({"tracker": "http://127.0.0.1:6969"}, "peer_host 0.0.0.0"),
    ],
)
def test_plain_text_beyond_loopback_is_refused_unless_insecure(
    cli: dict[str, Any], why: str
) -> None:
    config = _loaded(**cli)  # loading alone refuses nothing: containerd-config reads it
    with pytest.raises(ConfigError, match=why) as refused:
        config.check_serving()
    assert "give tls_dir" in str(refused.value) and "\n" not in str(refused.value)
    assert _config(**cli, insecure=True).insecure


def test_loopback_and_no_tracker_need_nothing() -> None:
    _config(**LOOPBACK_TRACKER)
    # The facade is the registry containerd pulls from, never TLS: where it
    # listens is the operator's choice (docs/SECURITY.md, "Tenant").
    _config(**LOOPBACK_TRACKER, listen="0.0.0.0:5000")
    _config(tracker="http://localhost:6969", peer_host="::1")
    # Without a tracker the node runs no swarm: the peer host is not opened.
    _config(peer_host="0.0.0.0")


def test_with_a_tls_dir_peers_and_facade_may_listen_beyond_loopback(tls_dir: Path) -> None:
    c = _config(
        tls_dir=str(tls_dir), tracker="https://198.18.0.1:6969", peer_host="0.0.0.0",
        listen="0.0.0.0:5000",
    )
    assert c.peer_ssl_port == 6882
    # Plain HTTP to a tracker on loopback is allowed (the rollout rule's test case)...
    _config(tls_dir=str(tls_dir), tracker="http://127.0.0.1:6969", peer_host="0.0.0.0")
    # ...beyond loopback it is not, and insecure cannot be given with tls_dir.
    with pytest.raises(ConfigError, match="plain HTTP beyond loopback"):
        _config(tls_dir=str(tls_dir), tracker="http://198.18.0.1:6969")


def test_with_a_tls_dir_there_is_no_token_and_the_certificate_names_the_node(
    tls_dir: Path,
) -> None:
    tracker = "https://127.0.0.1:6969"
    with pytest.raises(ConfigError, match="tls_dir or tracker_token, not both"):
        _config(tls_dir=str(tls_dir), tracker=tracker, tracker_token="s3cret")
    with pytest.raises(ConfigError, match="node_name 'other' is not 'n1'"):
        _config(tls_dir=str(tls_dir), tracker=tracker, node_name="other")
    assert _config(tls_dir=str(tls_dir), tracker=tracker, node_name="n1").node_name == "n1"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--tracker", "http://127.0.0.1:1"], "peer_host 0.0.0.0 serves the peer wire"),
        (
            ["--tracker", "http://198.18.0.1:1", "--peer-host", "127.0.0.1"],
            "tracker http://198.18.0.1:1 is plain HTTP beyond loopback",
        ),
    ],
)
def test_the_node_process_refuses_to_start_in_one_line(
    tmp_path: Path, args: list[str], why: str
) -> None:
    argv = [sys.executable, "-m", "p2preg", "node", "--upstream", UPSTREAM]
    argv += ["--data-dir", str(tmp_path / "data"), *args]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60,
        env=clean_env(drop_prefixes=["P2PREG_"]),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and why in proc.stderr, proc.stderr
    assert proc.stderr.startswith("p2preg node: ")
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_reading_the_config_for_its_upstreams_needs_no_certificate(tmp_path: Path) -> None:
    """`p2preg containerd-config` reads node.toml in an init container that holds no
    certificate: loading it must not run the serving checks the node runs at start."""
    toml = tmp_path / "node.toml"
    toml.write_text('upstream = ["seed.test=http://127.0.0.1:9"]\ntracker = "https://t.example:6969"\n'
                    f'tls_dir = "{tmp_path / "not-mounted-here"}"\n')
    config = load(NodeConfig, file=toml)
    with pytest.raises(ConfigError, match="not-mounted-here: not a directory"):
        config.check_serving()
    hosts = tmp_path / "certs.d"
    proc = subprocess.run(
        [sys.executable, "-m", "p2preg", "containerd-config", "--config", str(toml),
         "--hosts-dir", str(hosts), "--containerd-config", str(tmp_path / "absent.toml"),
         "--ctr-only"],
        capture_output=True, text=True, timeout=60, env=clean_env(drop_prefixes=["P2PREG_"]),
    )
    assert proc.returncode == 0, proc.stderr
    assert (hosts / "seed.test" / "hosts.toml").is_file()
