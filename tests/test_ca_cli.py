"""`p2preg ca` as a real process: files, modes, a node and a tracker that load them, refusals."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness.procs import clean_env
from p2preg.core.pki import Identity, identity_of, verify_chain
from p2preg.core.tls import load_tls_dir


def _ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", "ca", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(drop_prefixes=["P2PREG_"]),
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    out = tmp_path / "ca"
    proc = _ca("init", "--cluster", "prod-eu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_init_writes_a_private_ca_and_refuses_to_overwrite_it(ca_dir: Path) -> None:
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    assert _mode(ca_dir) == 0o700 and _mode(ca_dir / "ca.key") == 0o600
    key = (ca_dir / "ca.key").read_bytes()
    proc = _ca("init", "--cluster", "prod-eu", "--out", str(ca_dir))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"p2preg ca: {ca_dir / 'ca.crt'} exists; --force replaces")
    assert (ca_dir / "ca.key").read_bytes() == key
    proc = _ca("init", "--cluster", "prod-eu", "--out", str(ca_dir), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (ca_dir / "ca.key").read_bytes() != key and _mode(ca_dir / "ca.key") == 0o600


def test_issue_writes_the_cert_manager_layout_a_node_and_tracker_load(
    ca_dir: Path, tmp_path: Path
) -> None:
    node_dir, tracker_dir = tmp_path / "n1", tmp_path / "tracker"
    proc = _ca("issue", "--ca", str(ca_dir), "--node", "n1:5000", "--out", str(node_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("p2preg://prod-eu/node/n1:5000: ")
    assert "PRIVATE" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in node_dir.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert _mode(node_dir) == 0o700 and _mode(node_dir / "tls.key") == 0o600
    assert (node_dir / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    node = load_tls_dir(node_dir, role="node")
    assert node.identity == Identity("prod-eu", "node", "n1:5000")
    assert (node.not_after - node.not_after.now(node.not_after.tzinfo)).days in (29, 30)

    args = ["--tracker", "t", "--dns", "tracker.p2preg.svc", "--ip", "10.1.2.3", "--days", "3"]
    proc = _ca("issue", "--ca", str(ca_dir), *args, "--out", str(tracker_dir))
    assert proc.returncode == 0, proc.stderr
    tracker = load_tls_dir(tracker_dir, role="tracker")
    assert tracker.identity == Identity("prod-eu", "tracker", "t")
    assert (tracker.not_after - tracker.not_after.now(tracker.not_after.tzinfo)).days in (2, 3)
    pem = (tracker_dir / "tls.crt").read_bytes()
    assert identity_of(pem).uri == "p2preg://prod-eu/tracker/t"
    assert verify_chain(pem, (ca_dir / "ca.crt").read_bytes()).role == "tracker"


def test_issue_from_a_users_own_ca_names_the_cluster(ca_dir: Path, tmp_path: Path) -> None:
    """A CA made elsewhere need not be named after the cluster: `--cluster` says it."""
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=Corp Root", "-days", "30", "-keyout", str(own / "ca.key"),
         "-out", str(own / "ca.crt"), "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    proc = _ca("issue", "--ca", str(own), "--node", "a", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "common name 'Corp Root' is not a cluster name" in proc.stderr
    out = tmp_path / "a"
    proc = _ca("issue", "--ca", str(own), "--cluster", "corp", "--node", "a", "--days", "7",
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert load_tls_dir(out).identity == Identity("corp", "node", "a")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "--cluster", "Prod EU"], "p2preg ca: cluster name 'Prod EU': use lowercase"),
        (["init", "--cluster", "p", "--days", "0"], "p2preg ca: --days takes a whole number"),
        (["issue", "--ca", "{ca}"], "p2preg ca: give exactly one of --node NAME or --tracker"),
        (["issue", "--ca", "{ca}", "--node", "a", "--tracker", "b"], "give exactly one of"),
        (["issue", "--ca", "{ca}", "--node", "a/b"], "p2preg ca: name 'a/b': use letters"),
        (["issue", "--ca", "{ca}", "--node", "a", "--ip", "1.2.3"], "'1.2.3' is not an IP"),
        (["issue", "--ca", "{ca}", "--node", "a", "--dns", "a b"], "'a b' is not a DNS name"),
        (["issue", "--ca", "{ca}", "--node", "a", "--days", "4000"], "would outlive the CA"),
        (["issue", "--ca", "{tmp}/none", "--node", "a"], "ca.crt: cannot read it: No such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    ca_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    argv = [a.format(ca=ca_dir, tmp=tmp_path) for a in args]
    proc = _ca(*argv, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_issue_refuses_the_ca_dir_and_a_directory_open_to_others(
    ca_dir: Path, tmp_path: Path
) -> None:
    proc = _ca("issue", "--ca", str(ca_dir), "--node", "a", "--out", str(ca_dir))
    assert proc.returncode == 2 and "must not be the CA's directory" in proc.stderr
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    proc = _ca("issue", "--ca", str(ca_dir), "--node", "a", "--out", str(shared))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is open to others (mode 0755)" in proc.stderr
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("component", ["node", "tracker"])
def test_node_and_tracker_refuse_a_bad_tls_dir_at_start_in_one_line(
    ca_dir: Path, tmp_path: Path, component: str
) -> None:
    out = tmp_path / "id"
    proc = _ca("issue", "--ca", str(ca_dir), f"--{component}", "x", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (out / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    argv = [sys.executable, "-m", "p2preg", component, "--tls-dir", str(out)]
    argv += ["--data-dir", str(tmp_path / "data")]
    if component == "node":
        argv += ["--upstream", "http://127.0.0.1:9"]
    env = clean_env(drop_prefixes=["P2PREG_"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr == f"p2preg {component}: {out / 'tls.key'}: the key: not a PEM private key\n"
