"""The fan-out's clients: one pull per host, by `ctr` or by kubelet's CRI call, timed exactly.

Owns how a host's client pulls the image and how its end and CPU are known.
`CtrPull` runs `ctr images pull` (or `ctr content fetch`) in the host's
namespace, reaped by a waiter thread with its rusage. `CriPull` sends
`PullImage` on the host's containerd socket as kubelet does (harness/cri.py),
from a thread of this process over a channel connected before the start, so no
process start or import lands in the measured time; its CPU is containerd's,
counted there (the call itself costs kubelet nothing worth counting).

The two clients differ in what containerd does, which is why both exist:
`ctr images pull` (containerd 1.6) fetches every layer and only then unpacks
them one after another, while the CRI plugin pulls with containerd's unpacker,
which applies each layer as soon as it and the ones below it are fetched —
kubelet's pull overlaps the unpack with the download, ctr's cannot. Every pull
is prepared (`prepare_pulls`), then started (`start`) at the common moment. It
must not start a server, and kills only the pulls it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

from bench.fanout.cluster import Stage
from bench.fanout.settings import Settings
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import CriError, CriImageService, dial_image_service
from harness.netns import Host
from harness.procs import with_pdeathsig

__all__ = ["CriPull", "CtrPull", "Pull", "client_daemon", "prepare_pulls", "stop_pulls"]

REAP_WAIT_S = 15.0


class Pull(Protocol):
    """One host's pull: started once; `end` (monotonic) and `rc` set when `reaped`."""

    out: Path
    end: float | None
    rc: int | None
    cpu_s: float
    reaped: threading.Event

    def start(self) -> None: ...

    def kill(self) -> None: ...


class CtrPull:
    """One `ctr` child, reaped by a waiter thread with its rusage; killed only if unreaped."""

    def __init__(self, argv: list[str], out: Path, lock: threading.Lock) -> None:
        self._argv = argv
        self._lock = lock
        self.out = out
        self.popen: subprocess.Popen[bytes] | None = None
        self.end: float | None = None
        self.rc: int | None = None
        self.cpu_s = 0.0
        self.reaped = threading.Event()

    def start(self) -> None:
        with self.out.open("wb") as f:
            self.popen = subprocess.Popen(
                self._argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=Containerd.ctr_env(),
                start_new_session=True,
            )
        threading.Thread(target=self._wait, daemon=True, name=f"ctr-{self.popen.pid}").start()

    def _wait(self) -> None:
        assert self.popen is not None
        pid = self.popen.pid
        # Wait without reaping, so the pid cannot be reused while kill() may still aim at it.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        end = time.monotonic()
        with self._lock:
            _, status, usage = os.wait4(pid, 0)
            self.rc = self.popen.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime
            self.end = end
            self.reaped.set()

    def kill(self) -> None:
        with self._lock:
            if self.popen is not None and not self.reaped.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)


class CriPull:
    """kubelet's `PullImage` on one containerd socket, from a thread; its answer is the end."""

    def __init__(self, address: Path, ref: str, out: Path, timeout_s: float) -> None:
        self.out = out
        self._ref = ref
        self._timeout_s = timeout_s
        self.end: float | None = None
        self.rc: int | None = None
        self.cpu_s = 0.0
        self.reaped = threading.Event()
        # Connected now: the call at the start finds the channel ready.
        self._service: CriImageService = dial_image_service(address)

    def start(self) -> None:
        threading.Thread(target=self._call, daemon=True, name=f"cri-{self.out.stem}").start()

    def _call(self) -> None:
        try:
            image_id = self._service.pull_image(self._ref, timeout_s=self._timeout_s)
        except CriError as e:
            self.end, self.rc = time.monotonic(), 1
            self.out.write_text(f"{e}\n", "utf-8")
        else:
            self.end, self.rc = time.monotonic(), 0
            self.out.write_text(f"{image_id}\n", "utf-8")
        finally:
            self._service.close()
            self.reaped.set()

    def kill(self) -> None:
        """Close the channel: the call in flight ends with CANCELLED."""
        if not self.reaped.is_set():
            self._service.close()


def client_daemon(daemon: Containerd, settings: Settings) -> Containerd:
    """The daemon as the client's namespace sees it (kubelet's images live in `k8s.io`)."""
    return daemon.in_namespace(CRI_NAMESPACE) if settings.client == "cri" else daemon


def prepare_pulls(
    hosts: list[Host], stage: Stage, ref: str, settings: Settings, run_dir: Path
) -> list[Pull]:
    """One pull per host, ready to `start`."""
    lock = threading.Lock()
    pulls: list[Pull] = []
    for i, (host, daemon, hosts_dir) in enumerate(
        zip(hosts, stage.daemons, stage.hosts_dirs, strict=True)
    ):
        out = run_dir / f"{settings.client}{i}.out"
        if settings.client == "cri":
            pulls.append(CriPull(daemon.address, ref, out, settings.pull_timeout_s))
            continue
        args = daemon.pull_args(ref, hosts_dir, unpack=settings.unpack)
        argv = with_pdeathsig(daemon.ctr_argv(*args, netns=host.netns), "KILL")
        pulls.append(CtrPull(argv, out, lock))
    return pulls


def stop_pulls(pulls: list[Pull]) -> None:
    for p in pulls:
        p.kill()
    for p in pulls:
        p.reaped.wait(timeout=REAP_WAIT_S)
