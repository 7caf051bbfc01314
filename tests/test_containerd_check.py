"""containerd 1.6 to 2.1+: what `p2preg containerd-config` writes or refuses, what status says.

The configs in tests/data/containerd/ have the shape each release writes or a
distribution ships (1.6 on Debian 12, 1.7 from kubeadm/Kubespray, 2.0 on its
defaults, 2.1 as an EKS node has it); each is read with the daemon version it
belongs to. The command runs as an operator runs it; `p2preg status` is read
for the same host against a real node. The one real daemon here (Debian's
1.6) checks that its `--version` output is read right.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.node import open_node
from harness.procs import clean_env
from p2preg.node import containerd_check as ck

DATA = Path(__file__).parent / "data" / "containerd"
HOSTS = Path("/etc/containerd/certs.d")
CONFIG = Path("/etc/containerd/config.toml")
V2_KEY = 'plugins."io.containerd.grpc.v1.cri".registry.config_path = "/etc/containerd/certs.d"'
V3_KEY = "plugins.'io.containerd.cri.v1.images'.registry.config_path = \"/etc/containerd/certs.d\""
LOCAL_PULL = "plugins.'io.containerd.cri.v1.images'.use_local_image_pull = true"

# (config file, daemon version, CRI pulls read HOSTS, keys named to add, words in the reason)
CASES = [
    ("1.6-debian-default", "1.6.20", False, [V2_KEY], "sets no"),
    ("1.6-configured", "1.6.20", True, [], "reads hosts.toml from /etc/containerd/certs.d"),
    ("1.7-kubespray", "1.7.27", True, [], "reads hosts.toml"),  # 1.x splits the list
    ("2.0-default", "2.0.5", False, [V3_KEY], "as one directory"),
    ("2.0-configured", "2.0.5", True, [], "reads hosts.toml"),
    ("2.1-eks", "2.1.4", False, [LOCAL_PULL, V3_KEY], "as one directory"),
    ("2.1-single-dir", "2.1.4", False, [LOCAL_PULL], "transfer service"),
    ("2.1-configured", "2.1.4", True, [], "reads hosts.toml"),
    ("2.1-configured", "2.2.0", True, [], "reads hosts.toml"),
    # A 1.x config on a 2.1 daemon: use_local_image_pull needs version 3.
    ("1.6-configured", "2.1.1", False, [LOCAL_PULL, V3_KEY], "containerd config migrate"),
    # A 2.x config on a 1.x daemon does not load at all.
    ("2.1-configured", "1.7.27", False, [], "reads config version 1 or 2 only"),
]


def _check(name: str, version: str | None) -> ck.ConfigCheck:
    text = (DATA / f"{name}.toml").read_text()
    return ck.check_config(text, HOSTS, CONFIG, ck.parse_version(version) if version else None)


@pytest.mark.parametrize(("name", "version", "ok", "keys", "says"), CASES)
def test_each_release_and_its_config(
    name: str, version: str, ok: bool, keys: list[str], says: str
) -> None:
    check = _check(name, version)
    assert check.ok is ok and says in check.message and list(check.keys) == keys, check
    assert check.version == version
    if check.fix:
        # Pasting the fix (as tables) into the file makes the same daemon read HOSTS.
        fixed = _apply(tomllib.loads((DATA / f"{name}.toml").read_text()), check.fix)
        assert ck.check_config(fixed, HOSTS, CONFIG, ck.parse_version(version)).ok


def _apply(doc: dict[str, object], fix: str) -> str:
    """`doc` with the fix's tables merged in, as TOML (the fix alone names the version)."""
    patch = tomllib.loads(fix)
    if "version" in patch:  # a migration: the fix is the whole CRI part of the new file
        return fix
    plugins = doc.setdefault("plugins", {})
    assert isinstance(plugins, dict)
    for plugin, table in patch["plugins"].items():
        mine = plugins.setdefault(plugin, {})
        mine.setdefault("registry", {}).update(table.pop("registry", {}))
        mine.update(table)
    return _dump(doc)


def _dump(doc: dict[str, object], prefix: str = "") -> str:
    scalars = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix else []) + scalars
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append(_dump(v, f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)))
    return "\n".join(out) + "\n"


def test_an_unknown_daemon_is_judged_by_its_config_version() -> None:
    # No binary and no --containerd-version: version 3 is read as 2.1+, the stricter case.
    v3 = _check("2.0-configured", None)
    assert not v3.ok and list(v3.keys) == [LOCAL_PULL] and "taken as 2.x" in v3.version
    v2 = _check("1.6-configured", None)
    assert v2.ok and "taken as 1.x" in v2.version
    # No config file at all: containerd's defaults, which CRI pulls never read for us.
    for version, key in (("1.6.20", V2_KEY), ("2.0.0", V3_KEY)):
        none = ck.check_config(None, HOSTS, CONFIG, ck.parse_version(version))
        assert not none.ok and key in none.keys and "does not exist" in none.message


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
         ck.Version(1, 6, 20)),
        ("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da",
         ck.Version(1, 7, 27)),
        ("containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7193e4e490e9fbdc236c0e8",
         ck.Version(2, 1, 4)),
        ("2.1", ck.Version(2, 1, 0)),
        ("containerd: command not found", None),
    ],
)
def test_version_output(output: str, version: ck.Version | None) -> None:
    assert ck.parse_version(output) == version


def test_the_installed_daemons_version_is_read() -> None:
    # Debian 12's containerd, installed by scripts/install.sh: the test runs it.
    binary = shutil.which("containerd")
    assert binary is not None, "containerd is installed by scripts/install.sh"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    words = out.stdout.split()
    detected = ck.detect_version()
    assert detected is not None and words[0] == "containerd"
    assert any(w.startswith(f"{detected}") or w.startswith(f"v{detected}") for w in words[2:])


# -- the command and the status, as run -----------------------------------------------


def _p2preg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", *map(str, args)], capture_output=True, text=True,
        timeout=60, env=clean_env(drop_prefixes=["P2PREG_"]),
    )


def _host(tmp_path: Path, name: str) -> Path:
    """A host root whose /etc/containerd/config.toml is the named config."""
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / f"{name}.toml", host / "etc/containerd/config.toml")
    return host


@pytest.mark.parametrize(("name", "version", "ok", "keys", "says"), CASES)
def test_the_command_writes_or_refuses(
    tmp_path: Path, name: str, version: str, ok: bool, keys: list[str], says: str
) -> None:
    host = _host(tmp_path, name)
    proc = _p2preg("containerd-config", "--registry", "docker.io", "--host-root", host,
                   "--containerd-version", version)
    written = host / "etc/containerd/certs.d/docker.io/hosts.toml"
    if ok:
        assert proc.returncode == 0 and written.is_file(), proc.stderr
        assert f"containerd {version}: " in proc.stdout
        return
    assert proc.returncode == 2 and not written.exists()
    (line,) = proc.stderr.splitlines()  # one line, naming every key to add
    assert line.startswith("p2preg containerd-config: refusing to write") and says in line
    assert all(key in line for key in keys), line
    # For ctr alone the files are written all the same, with the loud banner.
    ctr = _p2preg("containerd-config", "--registry", "docker.io", "--host-root", host,
                  "--containerd-version", version, "--ctr-only")
    assert ctr.returncode == 0 and written.is_file() and "WARNING" in ctr.stderr


def test_status_reports_the_finding_for_the_node_on_this_machine(tmp_path: Path) -> None:
    with open_node(tmp_path / "node", ["http://127.0.0.1:9"]) as node:
        for name, version, ok, keys in (
            ("2.1-eks", "2.1.4", False, [LOCAL_PULL, V3_KEY]),
            ("2.1-configured", "2.1.4", True, []),
            ("1.6-debian-default", "1.6.20", False, [V2_KEY]),
        ):
            host = _host(tmp_path, name)
            proc = _p2preg("status", "--node", node.url, "--json", "--host-root", host,
                           "--containerd-version", version)
            assert proc.returncode == 0, proc.stderr
            finding = json.loads(proc.stdout)["containerd"]
            assert finding["ok"] is ok and finding["add"] == keys and finding["version"] == version
            table = _p2preg("status", "--node", node.url, "--host-root", host,
                            "--containerd-version", version)
            assert ("NO: they bypass the node" in table.stdout) is not ok, table.stdout


def test_a_node_exports_the_finding_as_a_metric_and_rereads_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text((DATA / "2.1-single-dir.toml").read_text())
    args = ("--containerd-config", str(config), "--containerd-version", "2.1.4")
    with open_node(tmp_path / "node", ["http://127.0.0.1:9"], args=args) as node:
        assert node.metric("p2preg_containerd_config_ok") == 0
        finding = json.loads(_p2preg("status", "--node", node.url, "--json").stdout)
        assert finding["node"]["containerd"]["add"] == [LOCAL_PULL]
        # The operator's fix, before containerd's restart: the next scrape says so.
        config.write_text((DATA / "2.1-configured.toml").read_text())
        assert node.metric("p2preg_containerd_config_ok") == 1
    with open_node(tmp_path / "plain", ["http://127.0.0.1:9"]) as node:
        assert "p2preg_containerd_config_ok" not in node.metrics()
