"""When libtorrent moves a torrent to its next tracker tier, with the node's settings.

A node given several trackers adds each as a tier of its own (docs/SWARM.md,
"Several trackers: one tier each"). This runs one libtorrent session with the
node's `session_settings` (plus the overrides a row names) and one private v2
torrent whose tier 0 answers, is a closed port, accepts and never answers, or
answers once and then closes; tier 1 always answers. Both tiers are small
announce endpoints in this process that count the requests they get (what is
measured is libtorrent's choice of tier, not a tracker). Prints, per row, the
seconds from adding the torrent (or, for the last row, from closing tier 0 and
forcing a re-announce) to tier 1's first announce, and each tier's announce
count; writes JSON to bench/results/. Not a test. Usage:

    .venv/bin/python -m bench.tracker_tiers
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
from rich.console import Console
from rich.table import Table

from p2preg.core.digest import Digest
from p2preg.node.swarmsettings import session_settings
from tracker.metainfo import make_metainfo

RESULTS = Path(__file__).resolve().parent / "results"
WATCH_S = 45.0  # the longest any row waits for tier 1
ANSWERS_WATCH_S = 5.0


class _Endpoint(http.server.ThreadingHTTPServer):
    """Answers every announce with no peers; counts them."""

    def __init__(self) -> None:
        self.hits: list[float] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(time.monotonic())
                reply: dict[bytes, Any] = {b"interval": 60, b"min interval": 15, b"peers": b""}
                body = lt.bencode(reply)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/announce"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a session paused mid-answer hangs up: nothing to report

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class Row:
    tier0: str
    settings: str
    tier1_after_s: float | None
    tier0_announces: int
    tier1_announces: int


def _torrent(workdir: Path) -> Any:
    data = os.urandom(1 << 20)
    digest = Digest.of(data)
    path = workdir / "blob"
    path.write_bytes(data)
    return lt.torrent_info(make_metainfo(path, digest, len(data)).data)


def _wait_tier1(session: Any, tier1: _Endpoint, since: float, watch_s: float) -> float | None:
    seen = len(tier1.hits)
    while time.monotonic() < since + watch_s and len(tier1.hits) == seen:
        session.wait_for_alert(200)
        session.pop_alerts()
    return tier1.hits[seen] - since if len(tier1.hits) > seen else None


def run_row(tier0: str, overrides: dict[str, Any], workdir: Path) -> Row:
    tier1 = _Endpoint()
    answering = _Endpoint() if tier0 in ("answers", "answers, then closed") else None
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    if tier0 == "accepts, never answers":
        silent.listen(64)
    port = silent.getsockname()[1]
    if tier0 == "port closed":
        silent.close()
    url0 = answering.url if answering is not None else f"http://127.0.0.1:{port}/announce"
    settings: Any = {**session_settings("127.0.0.1:0"), **overrides}
    session = lt.session(settings)
    atp = lt.add_torrent_params()
    atp.ti = _torrent(workdir)
    atp.save_path = str(workdir)
    atp.flags |= lt.torrent_flags.seed_mode
    atp.trackers, atp.tracker_tiers = [url0, tier1.url], [0, 1]
    try:
        start = time.monotonic()
        handle = session.add_torrent(atp)
        answering_now = tier0 == "answers"
        if tier0 == "answers, then closed":
            assert answering is not None
            deadline = start + WATCH_S
            while not answering.hits and time.monotonic() < deadline:
                session.wait_for_alert(200)
                session.pop_alerts()
            answering.stop()
            start = time.monotonic()
            handle.force_reannounce()
        # With tier 0 answering, a few seconds tell whether tier 1 hears of it too.
        after = _wait_tier1(session, tier1, start, ANSWERS_WATCH_S if answering_now else WATCH_S)
        time.sleep(0.5)  # an announce sent to both tiers at once is counted on both
        return Row(
            tier0,
            ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the node's",
            after,
            len(answering.hits) if answering is not None else 0,
            len(tier1.hits),
        )
    finally:
        session.pause()
        silent.close()
        tier1.stop()
        if answering is not None and tier0 == "answers":
            answering.stop()


ROWS: list[tuple[str, dict[str, Any]]] = [
    ("answers", {"announce_to_all_trackers": True}),
    ("answers", {}),
    ("port closed", {}),
    ("accepts, never answers", {"tracker_completion_timeout": 30}),
    ("accepts, never answers", {}),
    ("answers, then closed", {}),
]


def main() -> None:
    rows = []
    for tier0, overrides in ROWS:
        with tempfile.TemporaryDirectory(prefix="tiers-") as d:
            rows.append(run_row(tier0, overrides, Path(d)))
    table = Table(title=f"libtorrent {lt.__version__}: first announce to tier 1")
    for name in ("tier 0", "settings", "tier 1 after", "tier 0 announces", "tier 1 announces"):
        table.add_column(name)
    for r in rows:
        after = "never" if r.tier1_after_s is None else f"{r.tier1_after_s:.1f} s"
        table.add_row(r.tier0, r.settings, after, str(r.tier0_announces), str(r.tier1_announces))
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tracker-tiers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
