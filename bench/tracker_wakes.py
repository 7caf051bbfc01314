"""What a woken long poll costs the tracker: K lease requests held on one blob, then woken.

In a big pull most lease requests wait: every node asks for a layer before its
first copy is in, and the tracker holds the request (a long poll) until
something changes. A change wakes every request held on that digest, and each
tries again: the first seeder turns them all into SEEDED answers (each enters
its node in the swarm, picks its peers and sends the answer), and a released
lease grants one of them and sends the rest back to wait. The simulator
charged a request only when it arrived (bench/simulate/server.py); this
measures the two kinds of wake-up at a real tracker, and what a request that
is held costs as it arrives. One tracker (plain HTTP
with a token, pinned to core 0, its lease windows off so nothing else wakes
anyone), `--waiters` nodes on kept-alive connections from core 1, each with a
lease request for the same blob held open (`wait_s` 25, naming its peer
port). Then, twice: the holder releases its lease (one waiter granted, the
rest wait again), and the new holder publishes the blob's metainfo, which
enters it as the first seeder (every other waiter answered SEEDED). For each,
the tracker's CPU from /proc from just before the event until its answers
are in and the tracker is idle again, per waiter woken. Not a test: no
assertions on speed.

    .venv/bin/python -m bench.tracker_wakes [--waiters 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import trio

from bench.keptalive import answer_head, post_bytes
from bench.machine import cpu_seconds
from bench.tracker_load import make_torrents
from harness.node import metric_value
from harness.tracker import open_tracker
from p2preg.core import wire
from tracker.client import TrackerClient

TOKEN = "bench-wakes"
RESULTS = Path(__file__).parent / "results"
TRACKER_CORE, LOAD_CORE = "0", 1
FIRST_PORT = 20_000
# The tracker counts as idle again once a 50 ms step adds less than 1 ms of CPU.
IDLE_STEP_S, IDLE_CPU_S = 0.05, 0.001
# Lease windows off: no grant, silence or rate rule wakes the waiters meanwhile.
TRACKER_ARGS = (
    "--lease-grant-ack-s", "0", "--lease-silence-s", "30", "--lease-ttl-s", "30",
    "--lease-min-rate-bytes-s", "0", "--lease-wait-max-s", "25", "--log-level", "WARNING",
)  # fmt: skip


@dataclass(frozen=True)
class Wake:
    event: str
    woken: int
    answered: int  # answers that came back (the rest wait again)
    tracker_cpu_s: float
    us_per_woken: float


class Waiter:
    """One node's kept-alive connection with a lease request held open on it."""

    def __init__(self, i: int, stream: trio.SocketStream) -> None:
        self.node = f"waiter-{i}"
        self.port = FIRST_PORT + i
        self.stream = stream
        self.answer: wire.LeaseReply | None = None

    async def ask(self, digest: str, size: int) -> None:
        body = wire.encode(wire.LeaseRequest(self.node, size, 25.0, port=self.port))
        fields = f"Authorization: Bearer {TOKEN}\r\n"
        await self.stream.send_all(
            post_bytes("t", f"/v1/leases/{digest}", body, wire.CONTENT_TYPE, fields)
        )

    async def read_answer(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await self._receive()
        head, _, body = data.partition(b"\r\n\r\n")
        _, length, _ = answer_head(head)
        while len(body) < length:
            body += await self._receive()
        self.answer = wire.decode(wire.LeaseReply, body[:length])

    async def _receive(self) -> bytes:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise OSError(f"the tracker closed {self.node}'s connection before answering")
        return chunk


async def settled(pid: int) -> float:
    """The tracker's CPU seconds once it has gone idle."""
    last = cpu_seconds(pid)
    while True:
        await trio.sleep(IDLE_STEP_S)
        now = cpu_seconds(pid)
        if now - last < IDLE_CPU_S:
            return now
        last = now


async def long_polls(url: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics", timeout=10)).text
    return metric_value(text, "p2preg_tracker_long_polls")


async def wait_for_polls(url: str, count: int) -> None:
    for _ in range(600):
        if await long_polls(url) >= count:
            return
        await trio.sleep(0.1)
    raise RuntimeError(f"fewer than {count} lease requests held after 60 s")


async def measure(url: str, pid: int, waiters: int, workdir: Path) -> list[Wake]:
    (meta,) = make_torrents(workdir, 1)
    digest = str(meta.digest)
    holder = TrackerClient(url, node="holder", token=TOKEN)
    host, _, port = url.removeprefix("http://").partition(":")
    nodes: list[Waiter] = []
    try:
        granted = await holder.acquire_lease(meta.digest, size=meta.size)
        assert granted.status is wire.LeaseStatus.GRANTED and granted.lease_id is not None
        # All connections open first (the tracker's cap on connections yet to send a
        # request is raised for it), so that the asks alone are measured.
        for i in range(waiters):
            nodes.append(Waiter(i, await trio.open_tcp_stream(host, int(port))))
        cpu0 = await settled(pid)
        for node in nodes:
            await node.ask(digest, meta.size)
        await wait_for_polls(url, waiters)
        # What a request that is held costs on arrival (read, decided, parked).
        wakes = [_wake("asked, held", waiters, nodes, await settled(pid) - cpu0)]
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.read_answer)
            # A released lease: one waiter is granted it, the others wait again.
            cpu0 = await settled(pid)
            await holder.release_lease(meta.digest, granted.lease_id)
            await wait_for_polls(url, waiters - 1)
            cpu1 = await settled(pid)
            wakes.append(_wake("release", waiters, nodes, cpu1 - cpu0))
            (first,) = [n for n in nodes if n.answer is not None]
            # The new holder files the metainfo: the first seeder, every other waiter
            # is answered SEEDED.
            publisher = TrackerClient(url, node=first.node, token=TOKEN)
            publisher.peer_port = first.port
            cpu0 = await settled(pid)
            await publisher.publish_metainfo(meta.digest, meta.size, meta.data)
        cpu1 = await settled(pid)
        wakes.append(_wake("first seeder", waiters - 1, nodes, cpu1 - cpu0, already=1))
        await publisher.aclose()
        return wakes
    finally:
        await holder.aclose()
        for node in nodes:
            await node.stream.aclose()


def _wake(event: str, woken: int, nodes: list[Waiter], cpu_s: float, already: int = 0) -> Wake:
    answered = sum(n.answer is not None for n in nodes) - already
    return Wake(event, woken, answered, cpu_s, cpu_s / woken * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waiters", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2preg-bench-wakes-") as tmp:
        work = Path(tmp)
        room = str(max(1000, args.waiters + 10))
        extra = ("--max-long-polls", room, "--max-preauth-connections", room,
                 "--max-preauth-connections-per-ip", room)  # fmt: skip
        with open_tracker(work / "tracker", token=TOKEN, cpus=TRACKER_CORE,
                          args=[*TRACKER_ARGS, *extra]) as t:  # fmt: skip
            os.sched_setaffinity(0, {LOAD_CORE})
            wakes = trio.run(measure, t.url, t.process.pid, args.waiters, work)
    for w in wakes:
        cpu_ms = w.tracker_cpu_s * 1e3
        print(f"{w.event}: {w.woken} woken, {w.answered} answered, "
              f"tracker {cpu_ms:.0f} ms, {w.us_per_woken:.0f} µs per woken")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tracker-wakes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"waiters": args.waiters, "wakes": [asdict(w) for w in wakes]}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
