"""`p2preg containerd-config`: the files it writes, and real containerd pulling with them.

Units check the hosts.toml it renders and how it reads containerd's own
config.toml (CRI `config_path`; each release's own: tests/test_containerd_check.py).
The integration tests run the command as an operator would, then
`ctr images pull --hosts-dir` on a real containerd: with the node up the node
serves every blob (its metrics count them, the seed
registry's log shows only the node fetching), and with the node stopped the
same files make containerd fall back to the seed registry itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.containerd import Containerd
from harness.node import open_node
from harness.procs import clean_env, free_port
from harness.registry import Registry
from p2preg.core.config import HostPort
from p2preg.node import containerd_check as ck
from p2preg.node import containerd_config as cc
from tests.conftest import PushImage

SEED_NS = "seed.test"
NODE = "http://127.0.0.1:5000"
V2_CRI = '[plugins."io.containerd.grpc.v1.cri".registry]'


def _run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "p2preg", "containerd-config", *map(str, args)],
        capture_output=True, text=True, timeout=60,
        env=clean_env(drop_prefixes=["P2PREG_"]),
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# -- units -------------------------------------------------------------------------


def test_registry_names_and_their_upstreams() -> None:
    assert cc.parse_registry("docker.io") == cc.Registry(
        "docker.io", "https://registry-1.docker.io"
    )
    assert cc.parse_registry("ghcr.io") == cc.Registry("ghcr.io", "https://ghcr.io")
    assert cc.parse_registry("seed.test=http://127.0.0.1:5100/") == cc.Registry(
        "seed.test", "http://127.0.0.1:5100"
    )
    with pytest.raises(ValueError):
        cc.parse_registry("seed.test=ftp://x")
    with pytest.raises(ValueError):
        cc.parse_registry("a/b")
    assert cc.node_url(HostPort("0.0.0.0", 5000)) == "http://127.0.0.1:5000"
    assert cc.node_url(HostPort("::1", 5000)) == "http://[::1]:5000"


def test_hosts_toml_puts_the_node_first_and_keeps_the_registry_as_server() -> None:
    doc = tomllib.loads(cc.render_hosts_toml(cc.Registry("docker.io", "https://r1.example"), NODE))
    assert doc == {
        "server": "https://r1.example",
        "host": {NODE: {"capabilities": ["pull", "resolve"]}},
    }
    default = tomllib.loads(cc.render_hosts_toml(cc.Registry("_default", None), NODE))
    assert "server" not in default and list(default["host"]) == [NODE]


@pytest.mark.parametrize(
    ("config", "hosts_dir", "ok", "says"),
    [
        ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\nbin_dir = \"/x\"\n",
         "/etc/containerd/certs.d", False, "sets no"),
        (f'version = 2\n{V2_CRI}\nconfig_path = "/etc/other"\n',
         "/etc/containerd/certs.d", False, "is not /etc/containerd/certs.d"),
        (f'version = 2\n{V2_CRI}\nconfig_path = "/etc/containerd/certs.d"\n'
         f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
         'endpoint = ["https://m.example"]\n',
         "/etc/containerd/certs.d", False, "deprecated registry.mirrors"),
        ('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n',
         "/etc/containerd/certs.d", True, "disables containerd's CRI plugin"),
        ('[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n',
         "/etc/containerd/certs.d", True, "reads hosts.toml"),
        ("version = [", "/etc/containerd/certs.d", False, "not valid TOML"),
    ],
)
def test_reading_containerds_config(
    config: str | None, hosts_dir: str, ok: bool, says: str
) -> None:
    # Releases and their own configs: tests/test_containerd_check.py; here the odd cases.
    daemon = ck.Version(1, 6, 20)
    check = ck.check_config(config, Path(hosts_dir), Path("/etc/containerd/config.toml"), daemon)
    assert check.ok is ok and says in check.message, check
    if not ok and check.fix:
        # The fix, on its own, is a config whose CRI plugin reads hosts_dir.
        fixed = f"version = 2\n{check.fix}"
        assert ck.check_config(fixed, Path(hosts_dir), Path("/c"), daemon).ok


def test_files_it_did_not_write_are_kept_unless_forced(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    mine = hosts / "docker.io" / "hosts.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text('server = "https://my-own-mirror.example"\n')
    config = tmp_path / "config.toml"
    config.write_text(f'version = 2\n{V2_CRI}\nconfig_path = "{hosts}"\n')
    proc = _run("--registry", "docker.io", "--registry", "ghcr.io", "--hosts-dir", hosts,
                "--containerd-config", config, check=False)
    assert proc.returncode == cc.EXIT_FOREIGN_FILE
    assert "kept" in proc.stdout and "my-own-mirror" in mine.read_text()
    assert (hosts / "ghcr.io" / "hosts.toml").read_text().startswith(cc.MARKER)
    assert "reads hosts.toml" in proc.stdout and "WARNING" not in proc.stderr
    _run("--registry", "docker.io", "--hosts-dir", hosts, "--containerd-config", config, "--force")
    assert mine.read_text().startswith(cc.MARKER)
    again = _run("--registry", "docker.io", "--hosts-dir", hosts, "--containerd-config", config)
    assert again.stdout.startswith("unchanged")


def test_a_missing_config_path_is_refused_and_ctr_only_writes_anyway(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    args = ("--registry", "docker.io", "--hosts-dir", tmp_path / "certs.d",
            "--containerd-config", config, "--containerd-version", "1.6.20")
    refused = _run(*args, check=False)
    assert refused.returncode == 2 and not (tmp_path / "certs.d").exists()
    assert f'registry.config_path = "{tmp_path / "certs.d"}"' in refused.stderr
    # ctr --hosts-dir uses the files without config_path: written, with the banner.
    proc = _run(*args, "--ctr-only")
    assert "WARNING: kubelet pulls will NOT go through p2preg" in proc.stderr
    assert f'{V2_CRI}\n      config_path = "{tmp_path / "certs.d"}"' in proc.stderr
    assert "systemctl restart containerd" in proc.stderr
    assert (tmp_path / "certs.d/docker.io/hosts.toml").exists()


def test_a_host_root_maps_the_hosts_paths(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text(
        f'version = 2\n{V2_CRI}\nconfig_path = "/etc/containerd/certs.d"\n'
    )
    proc = _run("--registry", "docker.io", "--host-root", host)
    assert (host / "etc/containerd/certs.d/docker.io/hosts.toml").is_file()
    assert "reads hosts.toml from /etc/containerd/certs.d" in proc.stdout


def test_the_registries_and_the_node_come_from_the_node_config(tmp_path: Path) -> None:
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(
        'listen = "0.0.0.0:5055"\n'
        'upstream = ["docker.io=https://registry-1.docker.io", "seed.test=http://10.9.9.9:80"]\n'
    )
    _run("--config", node_toml, "--hosts-dir", tmp_path / "d", "--containerd-config",
         tmp_path / "none.toml", "--default", "--ctr-only")
    for ns, server in (("docker.io", "https://registry-1.docker.io"),
                       ("seed.test", "http://10.9.9.9:80"), ("_default", None)):
        doc = tomllib.loads((tmp_path / "d" / ns / "hosts.toml").read_text())
        assert doc.get("server") == server
        assert list(doc["host"]) == ["http://127.0.0.1:5055"]


def _fake_proc(root: Path, pid: int, config: Path | None, started_ticks: int, btime: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (root / "stat").write_text(f"cpu  1 2 3\nbtime {btime}\n")
    (d / "comm").write_text("containerd\n")
    argv = ["/usr/bin/containerd"] + (["--config", str(config)] if config else [])
    (d / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    fields = ["S"] + ["0"] * 18 + [str(started_ticks)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (containerd) " + " ".join(fields) + "\n")


def test_a_containerd_started_before_its_config_changed_is_found(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n")
    mtime = int(config.stat().st_mtime)
    ticks = os.sysconf("SC_CLK_TCK")
    proc = tmp_path / "proc"
    # Started 100 s before the change, with this config; started after it; another config.
    _fake_proc(proc, 41, config, 0, mtime - 100)
    _fake_proc(proc, 42, config, 200 * ticks, mtime - 100)
    _fake_proc(proc, 43, tmp_path / "other.toml", 0, mtime - 100)
    assert cc.stale_containerd(config, proc) == [41]


# -- real containerd -----------------------------------------------------------------


def _blob_user_agents(registry: Registry, since: int) -> list[str]:
    registry.settle()
    return [r.user_agent for r in registry.served_requests()[since:]
            if r.blob is not None and r.method == "GET"]


@pytest.mark.integration
def test_containerd_pulls_through_the_node_and_falls_back_to_upstream_without_it(
    registry: Registry, push_image: PushImage, tmp_path: Path,
    containerd_factory: Callable[..., Containerd],
) -> None:
    image = push_image(registry, "single")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    blob_bytes = sum(b.size for b in image.blobs)
    port = free_port()
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(
        f'listen = "127.0.0.1:{port}"\nupstream = ["{SEED_NS}={registry.url}"]\n'
    )
    hosts = tmp_path / "certs.d"
    first, second = containerd_factory(), containerd_factory()
    # The command reads the daemon's own config (CRI disabled there: only ctr pulls).
    proc = _run("--config", node_toml, "--hosts-dir", hosts,
                "--containerd-config", first.config_path)
    assert "disables containerd's CRI plugin" in proc.stdout
    doc = tomllib.loads((hosts / SEED_NS / "hosts.toml").read_text())
    assert doc["server"] == registry.url and list(doc["host"]) == [f"http://127.0.0.1:{port}"]

    with open_node(tmp_path / "node", [], args=("--config", str(node_toml)), port=port) as node:
        seen = len(registry.served_requests())
        first.pull(ref, hosts)
        assert first.is_unpacked(image.manifests[0])
        served = node.metric("p2preg_http_requests_total", route="blob", status="200")
        assert served >= len(image.blobs)
        assert node.metric("p2preg_upstream_blob_bytes_total") == blob_bytes
        agents = _blob_user_agents(registry, seen)
        # Only the node fetched blobs from the seed registry, containerd none.
        assert agents and not any("containerd" in a for a in agents), agents
    # The node is stopped now: the same files send containerd to the registry itself.
    seen = len(registry.served_requests())
    second.pull(ref, hosts)
    assert second.is_unpacked(image.manifests[0])
    agents = _blob_user_agents(registry, seen)
    assert len(agents) == len(image.blobs) and all("containerd" in a for a in agents), agents


@pytest.mark.integration
def test_the_default_namespace_sends_any_other_registry_to_the_node(
    registry: Registry, push_image: PushImage, tmp_path: Path, containerd: Containerd,
) -> None:
    image = push_image(registry, "single")
    hosts = tmp_path / "certs.d"
    port = free_port()
    # The node mirrors the registry under its own host name, which has no
    # hosts.toml directory: only `_default` can send containerd to the node.
    _run("--registry", f"{SEED_NS}={registry.url}", "--default", "--node",
         f"http://127.0.0.1:{port}", "--hosts-dir", hosts,
         "--containerd-config", containerd.config_path)
    assert sorted(p.name for p in hosts.iterdir()) == ["_default", SEED_NS]
    with open_node(tmp_path / "node", [registry.url], port=port) as node:
        containerd.pull(image.reference, hosts)
        assert containerd.is_unpacked(image.manifests[0])
        served = node.metric("p2preg_http_requests_total", route="blob", status="200")
        assert served >= len(image.blobs)


@pytest.mark.integration
def test_a_containerd_running_an_older_config_is_named(
    containerd: Containerd, tmp_path: Path
) -> None:
    args = ("--registry", "docker.io", "--hosts-dir", tmp_path / "d",
            "--containerd-config", containerd.config_path)
    assert "started before" not in _run(*args).stderr
    # Edited after containerd started: it still runs the old one.
    containerd.config_path.write_text(
        containerd.config_path.read_text() + f'\n{V2_CRI}\n  config_path = "{tmp_path / "d"}"\n'
    )
    # The start time /proc gives is coarse (`STALE_MARGIN_S`): date the edit past it
    # rather than hope the fixture took that long to get here.
    edited = time.time() + 2 * cc.STALE_MARGIN_S
    os.utime(containerd.config_path, (edited, edited))
    err = _run(*args).stderr
    assert f"containerd (pid {containerd.process.pid}) started before" in err
    assert "restart it" in err
