"""How many block requests a node keeps outstanding with one peer, and why not more.

Owns the libtorrent settings that bound a connection's queue of requests:
`max_allowed_in_request_queue`, which a node advertises to its peers as `reqq`
in the extended handshake, `max_out_request_queue`, and `whole_pieces_threshold`.
libtorrent 2.1 sets a connection's own cap to the `reqq` its peer advertised,
over `max_out_request_queue` (its peer log: `MAX_OUT_QUEUE_SIZE [ 2000 -> 4000 ]`),
so between nodes the advertised value is the one that counts: both are set alike.
With whole pieces preferred (a peer that could send a piece within
`whole_pieces_threshold` seconds), libtorrent queues up to 8 MiB of whole pieces
unsent on one connection, past any cap: off.

Why a cap: in libtorrent 2.1 an end-game copy is never cancelled. When a
block arrives, `incoming_piece` marks it `writing` in the piece picker and only
then cancels it on the other connections, and `cancel_request` returns at once
for a block the picker no longer calls `requested`: no CANCEL goes out, not even
for a request still unsent. Once every piece is requested, each connection with
nothing outstanding asks for a block another connection holds, and both copies
arrive. So what sits queued on the slower connections (a holder's upload shared
by seven nodes) when the end game starts is received twice; libtorrent's own
queues (thousands of blocks) made that a fifth of a node's bytes.

Why 32 blocks (512 KiB): it covers a 200 Mbit/s link's bandwidth-delay product
up to a 20 ms round trip, 1 Gbit/s up to 4 ms, per connection. 16 halved one
connection's rate on loopback (223 to 318 MB/s against 484 at 64) and cost the
fan-out 3 s of 26 at N = 8; 64 took those back but let a peer that turned slow
hold 1 MiB, 16 s at 64 KiB/s, and a download with it took 2.1 times as long
(1.1 at 16, 1.45 at 32). Since waiters join chunks out of step (chunkfollow.py,
`JOIN_SPREAD_S`), bytes received twice hardly depend on the cap: at a chunk's
size 16 and 8 change nothing, at 25 MiB 8 cuts them by two fifths for a round
40 % slower. docs/SWARM.md, "Redundant bytes on shaped links", has the peer log
and those rounds, and docs/BENCHMARKS.md, "The request cap, again", the fan-out.
"""

from __future__ import annotations

import libtorrent as lt

# Outstanding block requests per peer connection, either way.
REQUEST_QUEUE_BLOCKS = 32


def request_queue_settings() -> lt.settings_pack:
    """The session settings that bound every connection's request queue."""
    return {
        "max_out_request_queue": REQUEST_QUEUE_BLOCKS,
        "max_allowed_in_request_queue": REQUEST_QUEUE_BLOCKS,
        "whole_pieces_threshold": 0,
    }
