"""The cluster page (tracker/cluster_view.py, cluster_page.py, admin_http.py), in a real browser.

A real tracker process (the harness's) with its loopback admin listener gets
real announces and lease requests over HTTP; Debian's `chromium`, headless,
loads the page (`--dump-dom`, `--screenshot`) and the DOM it built is read
back: the nodes, the image and its blobs with their spread, the lease that
stopped moving, and a hostile node name shown as text, never run. In-process
tests cover the view's figures and queues; the config tests that the admin
listener takes a loopback address only (it has no authentication).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio
import trio.testing

from harness.procs import Process, clean_env, free_port, wait_until
from harness.tracker import TRACKER_COMMAND, open_tracker
from p2preg.core import wire
from p2preg.core.config import ConfigError, HostPort
from p2preg.core.digest import Digest
from tests.tracker_helpers import SteppedClock, blob_meta
from tracker.admin_http import PAGE_REUSE_MIN_S, AdminHttp
from tracker.client import open_tracker_client
from tracker.cluster_page import render_page
from tracker.cluster_view import cluster_view
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.images import ImageIndex
from tracker.state import MemoryStore

TOKEN = "page-token"
IMAGE = "sha256:" + "ab" * 32
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
CHROMIUM_TIMEOUT_S = 60.0
# When set, the screenshot test also copies its PNG there (docs/img/cluster-page.png).
SCREENSHOT_COPY_ENV = "P2PREG_CLUSTER_PAGE_PNG"


# -- reading the DOM back -------------------------------------------------------------


@dataclass
class Row:
    cls: str
    cells: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " | ".join(self.cells)


class _Dom(HTMLParser):
    """Table rows (class, cell texts) and every element name the browser built."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[Row] = []
        self.tags: list[str] = []
        self.title = ""
        self._cell: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append(Row(dict(attrs).get("class") or ""))
        elif tag in ("td", "th"):
            self._cell = []
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].cells.append("".join(self._cell).strip())
            self._cell = None
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def parse(dom: str) -> _Dom:
    doc = _Dom()
    doc.feed(dom)
    return doc


def rows(doc: _Dom, cls: str) -> list[Row]:
    return [r for r in doc.rows if r.cls == cls]


# -- chromium ------------------------------------------------------------------------------


def run_chromium(url: str, *args: str) -> str:
    """`chromium --headless --no-sandbox ARGS URL` in a fresh profile; its stdout.

    Bounded by CHROMIUM_TIMEOUT_S (subprocess.TimeoutExpired past it); then its
    process group (its own session, so only what this call started) is killed.
    """
    exe = shutil.which("chromium")
    assert exe is not None, "chromium is not installed: scripts/install.sh installs it"
    with tempfile.TemporaryDirectory(prefix="p2preg-chromium-") as profile:
        argv = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url,
        ]
        env = clean_env(HOME=profile)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
        except BaseException:  # the timeout, or the test interrupted
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this call started
            proc.communicate()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- the cluster, made by hand over real HTTP ------------------------------------------------


def announce_url(url: str, meta_ih: bytes, node: str, n: int, *, left: int, up: int) -> str:
    q = (
        f"info_hash={quote_from_bytes(meta_ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
        f"&port={7000 + n}&uploaded={up}&downloaded=0&left={left}&compact=1"
        f"&node={quote_from_bytes(node.encode())}&token={TOKEN}"
    )
    return f"{url}/announce?{q}"


async def make_cluster(url: str, tmp_path: Path) -> tuple[str, str, str]:
    """n1 fetched, filed and seeds blob 1 of IMAGE; a node with a hostile name
    downloads it; n2 holds blob 2's lease and never reports progress.
    Returns (blob 1's digest, blob 2's digest, n2's lease id)."""
    meta = blob_meta(tmp_path, 300_000)
    (ih,) = meta.swarm_keys
    stuck = Digest.of(os.urandom(64))
    async with (
        open_tracker_client(url, node="n1", token=TOKEN) as n1,
        open_tracker_client(url, node="n2", token=TOKEN) as n2,
        httpx.AsyncClient(headers={"Connection": "close"}) as http,
    ):
        lease = await n1.acquire_lease(meta.digest, size=meta.size, group=IMAGE, order=1)
        assert lease.status is wire.LeaseStatus.GRANTED and lease.lease_id is not None
        await n1.publish_metainfo(meta.digest, meta.size, meta.data)
        await n1.release_lease(meta.digest, lease.lease_id)
        for node, n, left, up in (("n1", 1, 0, 123_456), (HOSTILE, 3, 5, 0)):
            r = await http.get(announce_url(url, ih, node, n, left=left, up=up))
            assert r.status_code == 200 and b"failure" not in r.content, r.content
        held = await n2.acquire_lease(stuck, size=8 << 20, group=IMAGE, order=2)
        assert held.status is wire.LeaseStatus.GRANTED and held.lease_id is not None
    return str(meta.digest), str(stuck), held.lease_id


def wait_until_stuck(admin: str, tracker: Process) -> None:
    """Until the page reports a stuck lease (its rate window has passed); bounded."""

    def stuck() -> bool:
        return b'class="lease stuck"' in httpx.get(admin + "/", timeout=10).content

    wait_until(stuck, timeout_s=30, what="a stuck lease on the page", process=tracker)


def tracker_args(admin_port: int) -> list[str]:
    # A one-second rate window, so a lease without progress is stuck within the test.
    return [
        "--admin-listen", f"127.0.0.1:{admin_port}",
        "--lease-rate-window-s", "1", "--lease-ttl-s", "300",
    ]


# -- tests ---------------------------------------------------------------------------------


async def test_chromium_shows_nodes_spread_and_a_stuck_lease(tmp_path: Path) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with open_tracker(tmp_path / "t", token=TOKEN, args=tracker_args(admin_port)) as tracker:
        seeded, stuck, lease_id = await make_cluster(tracker.url, tmp_path)
        await trio.to_thread.run_sync(wait_until_stuck, admin, tracker.process)
        dom = await trio.to_thread.run_sync(run_chromium, admin + "/", "--dump-dom")
        shot = tmp_path / "cluster-page.png"
        await trio.to_thread.run_sync(
            run_chromium, admin + "/", f"--screenshot={shot}", "--window-size=1280,1400",
            "--hide-scrollbars",
        )
    doc = parse(dom)
    # Nodes: n1 seeds and said it uploaded 123,456 bytes; the hostile name is text.
    nodes = {r.cells[0]: r for r in rows(doc, "node")}
    assert set(nodes) == {"n1", HOSTILE}
    assert nodes["n1"].cells[2:4] == ["1", "0"] and nodes["n1"].cells[4] == "120.6 KiB"
    assert "script" not in doc.tags and "img" not in doc.tags and doc.title == "p2preg cluster"
    # The image and its blobs: blob 1 seeded by one of the two nodes, blob 2 by none.
    (image,) = rows(doc, "image")
    assert IMAGE in image.text and "1 of 2 blobs seeded" in image.text
    spread = {r.cells[0]: r.cells[2] for r in rows(doc, "image-blob")}
    assert spread[seeded].startswith("1 seeding, 1 downloading, of 2 nodes")
    assert spread[stuck].startswith("0 seeding, 0 downloading, of 2 nodes")
    (filed,) = [r for r in rows(doc, "blob") if r.cells[0] == seeded]
    assert filed.cells[4] == "n1"
    # The lease n2 holds and never renewed is stuck; no other lease is held.
    (lease,) = rows(doc, "lease stuck")
    assert lease.cells[:3] == [stuck, "n2", IMAGE] and "no progress" in lease.cells[-1]
    assert rows(doc, "lease") == [] and lease_id not in dom and TOKEN not in dom
    traffic = {r.cells[0]: r.cells[1] for r in rows(doc, "traffic")}
    assert traffic["upstream: published blobs"] == "293.0 KiB"
    assert traffic["between nodes: reported uploaded"] == "120.6 KiB"
    assert png_size(shot) == (1280, 1400)
    copy_to = os.environ.get(SCREENSHOT_COPY_ENV)
    if copy_to:
        shutil.copyfile(shot, copy_to)


async def test_admin_port_is_read_only_and_apart(tmp_path: Path) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with open_tracker(tmp_path / "t", token=TOKEN, args=tracker_args(admin_port)) as tracker:
        async with httpx.AsyncClient() as http:
            page = await http.get(admin + "/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "script-src" not in page.headers["content-security-policy"]
            assert TOKEN not in page.text and "No node has announced." in page.text
            assert (await http.post(admin + "/", content=b"")).status_code == 405
            assert (await http.get(admin + "/v1/status")).status_code == 404
            assert (await http.get(admin + "/healthz")).text == "ok\n"
            # The page is not on the tracker's own port.
            assert (await http.get(tracker.url + "/")).status_code == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "tracker.example"])
def test_admin_listen_takes_loopback_only(host: str) -> None:
    with pytest.raises(ConfigError, match=r"admin_listen .* is not a loopback address"):
        TrackerConfig(admin_listen=HostPort(host, 8080))
    for ok in ("127.0.0.1", "::1", "localhost"):
        assert TrackerConfig(admin_listen=HostPort(ok, 8080)).admin_listen is not None


def test_tracker_refuses_a_non_loopback_admin_listen_in_one_line(tmp_path: Path) -> None:
    argv = [
        *TRACKER_COMMAND, "tracker", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
        "--admin-listen", "0.0.0.0:8080",
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=clean_env(drop_prefixes=["P2PREG_"])
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "admin_listen 0.0.0.0:8080 is not a loopback address" in lines[0]


async def test_view_counts_queues_and_escapes_image_names(tmp_path: Path) -> None:
    clock = SteppedClock()
    config = TrackerConfig(data_dir=tmp_path, lease_rate_window_s=10.0)
    t = Tracker(config, MemoryStore(), clock=clock)
    image_name = "<b>img</b>"
    blobs = [str(Digest.of(bytes([i]))) for i in range(2)]
    first = await t.acquire_lease(blobs[0], wire.LeaseRequest("a", 100, group=image_name, order=1))
    assert first.status is wire.LeaseStatus.GRANTED
    async with trio.open_nursery() as nursery:
        # b asks for the image's next blob and waits: its one upstream slot is taken.
        second = wire.LeaseRequest("b", 100, 5.0, image_name, 2)
        nursery.start_soon(partial(t.acquire_lease, blobs[1], second))
        await trio.testing.wait_all_tasks_blocked()
        view = cluster_view(t, clock.now)
        (image,) = view.images
        assert image.name == image_name and image.queued == 1
        assert [b.digest for b in image.blobs] == blobs and image.seeded_blobs == 0
        (lease,) = view.leases
        assert (lease.holder, lease.waiting, lease.stuck) == ("a", 1, "")
        clock.step(11)
        view = cluster_view(t, clock.now)
        assert view.stuck_count == 1 and "no progress for 11 s" in view.leases[0].stuck
        page = render_page(view).decode()
        assert "&lt;b&gt;img&lt;/b&gt;" in page and "<b>img</b>" not in page
        nursery.cancel_scope.cancel()


def test_image_index_is_bounded() -> None:
    index = ImageIndex(max_images=2, max_blobs=2)
    for order, digest in enumerate(("d3", "d1", "d2")):
        index.note("img1", digest, order)
    index.note("img2", "e", 0)
    index.note("x" * 161, "f", 0)
    index.note("img3", "g", 0)
    assert index.images() == {"img3": ["g"], "img2": ["e"]}
    index.note("img2", "e2", -1)
    assert index.images()["img2"] == ["e2", "e"] and len(index) == 2


async def test_a_page_is_reused_for_ten_times_its_build_time_and_at_least_a_second(
    tmp_path: Path,
) -> None:
    clock = SteppedClock()
    t = Tracker(TrackerConfig(data_dir=tmp_path), MemoryStore(), clock=clock)
    timer = [100.0]
    app = AdminHttp(t, clock, timer=lambda: timer[0])
    first = app.page()
    assert b"No lease is held." in first
    granted = await t.acquire_lease(str(Digest.of(b"x")), wire.LeaseRequest("n9", 10))
    assert granted.status is wire.LeaseStatus.GRANTED
    timer[0] += PAGE_REUSE_MIN_S * 0.99
    assert app.page() is first  # built in no time: reused for the minimum
    timer[0] += PAGE_REUSE_MIN_S * 0.02
    assert b'class="holder">n9<' in app.page()
