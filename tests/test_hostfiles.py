"""Private files on the host (p2preg/core/hostfiles.py): 0700 directories, 0600 files.

The helpers are checked under a wide-open umask; then a real tracker and two
nodes, started with umask 000, pull a blob through the swarm (so libtorrent,
SQLite and the store all write), and every directory and file under their
data directories is walked: no group or other bit anywhere. A data directory
left open by an older version is tightened at start; one owned by another
user is refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from harness.node import open_node
from harness.registry import Registry
from harness.tracker import open_tracker
from p2preg.core.config import ConfigError
from p2preg.core.hostfiles import (
    open_private,
    private_dir,
    read_secret_file,
    write_private,
)
from tests.conftest import PushImage


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _open_bits(root: Path) -> list[str]:
    out = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if stat.S_IMODE(mode) & 0o077:
            out.append(f"{path} {stat.S_IMODE(mode):04o}")
    return out


def test_the_helpers_ignore_a_wide_umask(tmp_path: Path) -> None:
    with umask(0):
        d = private_dir(tmp_path / "a" / "b")
        os.close(open_private(d / "f"))
        write_private(d / "g", b"x")
    for p, want in ((tmp_path / "a", 0o700), (d, 0o700), (d / "f", 0o600), (d / "g", 0o600)):
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert sorted(x.name for x in d.iterdir()) == ["f", "g"]  # no temp file left


def test_an_open_data_dir_is_tightened_and_a_foreign_or_linked_one_refused(
    tmp_path: Path,
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    private_dir(open_dir)
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(open_dir)
    with pytest.raises(ConfigError, match="not a link"):
        private_dir(link)
    if os.geteuid() == 0:  # only root can give a directory away
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 12345, -1)
        with pytest.raises(ConfigError, match="belongs to uid 12345"):
            private_dir(foreign)
    # A planted link cannot redirect a private write.
    (open_dir / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        open_private(open_dir / "planted")
    assert not (tmp_path / "elsewhere").exists()


def test_secret_files_must_be_private_and_not_empty(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("  \n")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(f, "x")
    f.write_text("value\n")
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="other users may read it"):
        read_secret_file(f, "x")
    f.chmod(0o400)
    assert read_secret_file(f, "x") == "value"


@pytest.mark.integration
def test_after_a_swarm_pull_nothing_in_the_data_dirs_is_open_to_others(
    registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    image = push_image(registry, "single")
    # An old node's store, written with default modes, is tightened at start.
    stale = tmp_path / "node1" / "data"
    stale.mkdir(parents=True, mode=0o755)
    stale.chmod(0o755)
    with umask(0), ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(tmp_path / "tracker", token="hostfiles-test"))
        nodes = [
            stack.enter_context(open_node(
                tmp_path / f"node{i}", [f"seed.test={registry.url}"], name=f"node{i}",
                args=("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                      "--p2p-min-bytes", "0", "--node-name", f"node{i}"),
                env={"P2PREG_TRACKER_TOKEN": "hostfiles-test"},
            ))
            for i in range(2)
        ]
        for node in nodes:
            for blob in image.blobs:
                url = f"{node.url}/v2/{image.repository}/blobs/{blob.digest}?ns=seed.test"
                assert httpx.get(url, timeout=60).status_code == 200
        assert nodes[1].metric("p2preg_peer_blob_bytes_total") > 0  # libtorrent wrote too
        for data_dir in (tracker.data_dir, *(n.data_dir for n in nodes)):
            files = [p for p in data_dir.rglob("*") if p.is_file()]
            assert files, data_dir
            assert _open_bits(data_dir) == [], data_dir
        blobs = list((nodes[1].data_dir / "blobs").rglob("*"))
        assert any(p.is_file() for p in blobs) and (nodes[1].data_dir / "swarm").is_dir()
