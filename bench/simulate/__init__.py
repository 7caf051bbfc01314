"""A discrete-event simulation of a whole cluster pulling one image, driving the real policy code.

N nodes ask for every layer of one image at the same moment. Who fetches
from upstream, and when, is decided by the tracker's own sans-IO code —
`LeaseBook` (tracker/leases.py), `UpstreamQueue` (tracker/upstream_queue.py)
and the replies of tracker/lease_replies.py — read by the node's own
`LeaseWait` (p2preg/node/leasewait.py); which peers a node is given comes from
the real `PeerTable` (tracker/peers.py) and `hand_out` (tracker/handout.py),
or from a uniform pick to compare against. Around them the simulator models:

- links: every node has an uplink and a downlink of B, the seed registry an
  upstream link of U; transfers are fluid and re-rated at events (engine.py:
  max-min water-filling on U, equal shares per link end between peers);
  every link delivers the goodput share the fan-out benchmark measured
  (47.8 of 50 Mbit/s);
- chunks: peers move whole chunks of at least 4 MiB (whole pieces), and a node
  uploads a chunk only once it holds all of it; a lease holder serves nothing
  of a layer before it has fetched, verified and filed it (as the node does);
- libtorrent's limits where they matter: 400 connections per node (p2preg's
  setting), one connection per torrent, 8 concurrent uploads (libtorrent's
  default unchoke slots) and 8 downloads per node, rarest-first picking,
  redundant seed-to-seed connections closed;
- the control plane: long-polled lease requests (held up to the tracker's
  `lease_wait_max_s`, woken by a first seeder, a released or expired lease or
  a freed upstream slot), a renewal at once on a grant (its acknowledgement)
  and then every third of `lease_silence_s` until the release, the tracker
  looking for silent holders and unacknowledged grants every quarter of the
  shorter of `lease_silence_s` and `lease_grant_ack_s`, the sweep every 5 s, announces
  on joining, on completing and every announce interval, a seed confirmation after
  each download from peers (with `--announces entered`, the SEEDED answer, the
  confirmation and the publish stand for the join and completion announces, as
  the node's do since 2026-12-07);
- failures: a share of the nodes die at random times within the bound, some of
  them while holding a lease halfway through their fetch; the dead renew and
  announce nothing, their transfers stop, and the tracker finds out by its
  own rules (lease silence and expiry, peer TTL) and from stall reports: a
  download alone for `stall_report_s` reports the peers it could not reach
  (the tracker's real admission rules delist a peer on two reporters) and
  asks for the lease again (`stalls`).

What it leaves out: the machine (CPU, disk, hashing beyond a fixed rate; the
fan-out benchmark's two shared cores slow its spread, and the client's fetch
and unpack are not simulated); TCP itself (slow start, RTT-bound windows,
per-flow fairness) and latency between peers; libtorrent's block pipelining
within a piece, its choker (tit-for-tat, optimistic unchokes) and end-game
duplicates (its connection limit and the room a full end makes are modelled,
swarm.py); seed confirmations' admission, reports of live peers that stall,
disputes and quotas at the tracker (every completed node counts as a seeder
at once); of the tracker's own work, all but its requests (server.py queues
those at k replicas with measured costs; the re-decisions of woken long
polls, its sweeps and its store are not charged); an exact max-min share
between peers (what one end of a transfer leaves unused is not passed on).
The client asks for `client_downloads` layers at a time (containerd's
`max_concurrent_downloads`, 3 under kubelet; 0: every layer at once, as
`ctr` does).

The package: `params` (what a run is), `engine` (clock, events, fluid links),
`swarm` (connections, slots, chunk picking), `stalls` (a download's stall
watch), `control` (the simulated tracker
around the real policy code), `server` (the tracker's replicas as queues),
`cluster` (the nodes' behaviour, one run),
`result` (what a run measured), `report` (tables, plot, the comparison with
bench/fanout), `__main__` (the command line; see docs/BENCHMARKS.md).
"""
