"""The `p2preg` command: subcommands, and configuration errors as one line and status 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from harness.procs import clean_env
from p2preg.cli import SUBCOMMANDS


def _p2preg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", *args], capture_output=True, text=True, timeout=60,
        env=clean_env(drop_prefixes=["P2PREG_"]),
    )


def test_every_subcommand_answers_help() -> None:
    assert {"node", "tracker", "containerd-config", "preheat", "status"} <= set(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        proc = _p2preg(name, "--help")
        assert proc.returncode == 0 and f"usage: p2preg {name}" in proc.stdout, proc.stderr


def test_a_tracker_that_cannot_listen_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _p2preg("tracker", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"p2preg tracker: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_operator_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    proc = _p2preg("containerd-config", "--hosts-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("p2preg containerd-config: name the")
    proc = _p2preg("preheat", "nginx", "--seeders", "0")
    assert proc.returncode == 2 and "--seeders must be ≥ 1" in proc.stderr


def test_the_tracker_takes_no_token_on_its_command_line(tmp_path: Path) -> None:
    """argv is readable by every local user (/proc/<pid>/cmdline): the flag is gone."""
    proc = _p2preg("tracker", "--token", "on-the-command-line", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "unrecognized arguments: --token" in proc.stderr
