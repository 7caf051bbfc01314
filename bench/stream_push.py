"""What one message sent on a held connection costs a trio server, per connection.

The tracker's serving replica answers each node on the node's own connection:
a woken long poll is a task that wakes, makes its answer and sends it through
its stream. Any design that tells 10,000 nodes about each of an image's layers
pays that send once per node per layer, whatever it batches on the request
side: a long poll's answer and a frame pushed on a stream held open alike. This
measures the send alone, without the tracker's HTTP and rules, so a design's
budget can be counted from it: `--connections` connections held open to a
trio server on core 0 (the cluster's mutual TLS from p2preg.core.tls, or plain
TCP with `--plain`), a client process on core 1 reading them, then
`--rounds` times one frame of `--frame-bytes` to every connection, sent

- `task`: by each connection's own task, woken by an event (a woken long poll);
- `loop`: by one task, to every stream in turn (a broadcast);

and the server's CPU per frame sent (process time, from setting the event to the
last frame written). Not a test: no assertions on speed. Usage:

    .venv/bin/python -m bench.stream_push [--connections 2000] [--plain]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from harness.tlscerts import ClusterCA
from p2preg.core.tls import client_context, load_tls_dir, server_context

SERVER_CORE, CLIENT_CORE = 0, 1
MODES = ("task", "loop")


async def _serve(args: argparse.Namespace, ctx: ssl.SSLContext | None) -> dict[str, list[float]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    streams: list[trio.abc.Stream] = []
    everyone_in = trio.Event()
    # The `task` rounds' starts, one event each.
    round_go = [trio.Event() for _ in range(args.rounds)]
    sent = 0
    all_sent = trio.Event()
    frame = b"f" * args.frame_bytes

    async def held(sock: trio.SocketStream) -> None:
        nonlocal sent
        stream: trio.abc.Stream = sock
        if ctx is not None:
            stream = trio.SSLStream(sock, ctx, server_side=True)
            await stream.do_handshake()
        streams.append(stream)
        if len(streams) == args.connections:
            everyone_in.set()
        for go in round_go:  # woken, then send: a long poll's answer
            await go.wait()
            await stream.send_all(frame)
            sent += 1
            if sent == len(streams):
                all_sent.set()
        await trio.sleep_forever()

    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, held, listeners)
        client = await trio.lowlevel.open_process(
            ["taskset", "-c", str(CLIENT_CORE), sys.executable, "-m", "bench.stream_push",
             "--client", str(port), "--connections", str(args.connections),
             *(["--plain"] if ctx is None else ["--tls-dir", str(args.tls_dir)])],
        )  # fmt: skip
        await everyone_in.wait()
        await trio.sleep(1.0)
        for go in round_go:
            for mode in MODES:
                started, sent = time.process_time(), 0
                if mode == "task":
                    all_sent = trio.Event()
                    go.set()
                    await all_sent.wait()
                else:
                    for stream in streams:
                        await stream.send_all(frame)
                results[mode].append((time.process_time() - started) / len(streams) * 1e6)
                await trio.sleep(0.3)  # let the client drain before the next round
        client.terminate()
        await client.wait()
        nursery.cancel_scope.cancel()
    return results


async def _read_all(port: int, connections: int, ctx: ssl.SSLContext | None) -> None:
    async def one() -> None:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        stream: trio.abc.Stream = sock
        if ctx is not None:
            stream = trio.SSLStream(sock, ctx, server_hostname="127.0.0.1")
            await stream.do_handshake()
        while await stream.receive_some(65536):
            pass

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one)
            await trio.sleep(0.001)  # under the server's listen backlog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--frame-bytes", type=int, default=900,
                        help="about a SEEDED answer naming 50 peers and its torrent")
    parser.add_argument("--plain", action="store_true", help="plain TCP, no TLS")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.client is not None:
        ctx = None if args.plain else client_context(load_tls_dir(args.tls_dir, role="node"),
                                                     check_hostname=False)  # fmt: skip
        trio.run(_read_all, args.client, args.connections, ctx)
        return
    os.sched_setaffinity(0, {SERVER_CORE})
    with tempfile.TemporaryDirectory() as tmp:
        server_ctx = None
        if not args.plain:
            ca = ClusterCA.make("bench")
            server_dir = ca.tls_dir(Path(tmp) / "tracker", "tracker", "t0", ips=["127.0.0.1"])
            args.tls_dir = ca.tls_dir(Path(tmp) / "node", "node", "n0")
            server_ctx = server_context(load_tls_dir(server_dir, role="tracker"))
        results = trio.run(_serve, args, server_ctx)
    transport = "plain" if args.plain else "mTLS"
    summary = {
        mode: {"median_us": statistics.median(v), "min_us": min(v), "max_us": max(v)}
        for mode, v in results.items()
    }
    for mode, s in summary.items():
        print(f"{transport} {mode}: {s['median_us']:.0f} µs per frame "
              f"(rounds {s['min_us']:.0f} to {s['max_us']:.0f})")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"stream-push-{transport}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "per_frame_us": results, "summary": summary}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
