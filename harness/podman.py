"""Debian's podman as a pulling client, with all of its state in one directory.

Owns running `podman` as root with its image store (`--root`, `--tmpdir`)
under a directory of the caller's and its `--runroot` in a short temp dir, the
`vfs` storage driver (no overlay or fuse mount to leave behind), cgroupfs, no
event log, and the registries.conf the caller names
(CONTAINERS_REGISTRIES_CONF); each call is bounded. A pull starts no daemon,
so there is nothing to stop afterwards. It must not read the machine's own
image store or registries.conf.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.procs import clean_env

__all__ = ["PODMAN_BIN", "Podman", "open_podman"]

PODMAN_BIN = Path("/usr/bin/podman")


@dataclass(frozen=True)
class Podman:
    workdir: Path
    runroot: Path  # podman refuses a runroot path longer than 50 characters
    registries_conf: Path

    def run(self, *args: str, timeout_s: float = 120.0) -> str:
        """`podman ARGS`; a failure raises with its stderr."""
        for d in ("root", "tmp"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        argv = [
            os.fspath(PODMAN_BIN),
            "--root", os.fspath(self.workdir / "root"),
            "--runroot", os.fspath(self.runroot),
            "--tmpdir", os.fspath(self.workdir / "tmp"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "none",
            *args,
        ]
        env = clean_env(
            drop_prefixes=["CONTAINERS_"],
            CONTAINERS_REGISTRIES_CONF=os.fspath(self.registries_conf),
            TMPDIR=os.fspath(self.workdir / "tmp"),
        )
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s,
            stdin=subprocess.DEVNULL, env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def pull(self, reference: str) -> str:
        """Pull `reference`; returns the image ID podman printed."""
        return self.run("pull", "--quiet", reference).strip()

    def manifest_digest(self, reference: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Digest}}", reference).strip()


@contextmanager
def open_podman(workdir: Path, registries_conf: Path) -> Iterator[Podman]:
    """A podman whose store is in `workdir` and whose runroot is a short temp dir, removed after."""
    with tempfile.TemporaryDirectory(prefix="p2preg-podman-", dir="/tmp") as runroot:
        yield Podman(workdir, Path(runroot), registries_conf)
