"""Peer-to-peer blob throughput of the node's libtorrent session, next to nginx, same run.

What it measures: how fast one blob moves between libtorrent sessions configured
exactly as a node configures its own (`p2preg.node.swarm.session_settings`), through
the cluster's own torrent format (`tracker.metainfo.make_metainfo`) and a real
tracker process, compared with nginx serving the same bytes from the same disk.

How: a random blob (200 MiB by default) is written to a work directory, its
metainfo made and filed with a real tracker (`harness.tracker`) before any
announce, as a node that fetched it upstream files it: the seeder's node
takes the digest's lease, publishes, and releases the lease once its seeder
was announced. Every peer is a node of its own to the tracker (`node=` name,
or its certificate under TLS), which keeps one peer per node in a swarm.
One seeder process seeds the blob (seed mode, as `Swarm.seed` does) for the
whole run; an untimed warm-up transfer first makes it check every piece once.
Then rounds alternate (order flipped every round):

- pair: one leecher process downloads from the seeder;
- pairtls: the same between two TLS nodes of a fresh cluster CA (an SSL
  torrent of the same blob, `s` ports, certificates set as the node's swarm
  sets them), announcing to a second tracker started with that CA's
  `--tls-dir`, with its own seeder; the ratio TLS pair / plain pair is reported;
- swarm: N leecher processes (4 by default) download at once, from the seeder
  and from each other; each keeps seeding until all are done;
- nginx: `sendfile on`, one worker, serving the same file; `curl -o /dev/null`
  with 1 client and with N concurrent clients.
- slowpeer and fast2 (`--cases slowpeer` runs both): a tracker of their own,
  where the blob is filed with no seeder; one leecher starts alone (slowpeer:
  beside a seeder limited to `--slow-from-kib-s`, 4 MiB/s); `--slow-head-s`
  (3 s) later that seeder drops to `--slow-kib-s` (64 KiB/s; a node that got
  busy) and two fast seeders join (each checks its hard link of the blob
  first). Timed from the first fast seeder's `ready` to the leecher's flush;
  fast2 is the same round without the slow seeder, and fast2/slowpeer is the
  time the slow peer costs. What the slow seeder sent, before it slowed and in
  all, is in the JSON. `--slow-from-kib-s 64` makes it slow from the start.

Every peer is a separate process on 127.0.0.1, announcing to the tracker's HTTP
announce URL. A leecher is started and listening before its round; its time is
from `add_torrent` to the torrent finished *and* its disk writes flushed
(`cache_flushed_alert`), tracker announce and peer connect included. A swarm
round's aggregate is N * size over first `add_torrent` to last flush. A curl
time is curl's own `time_total`; N clients give N * size over the slowest one.
MB/s is 10⁶ bytes per second. Before each measurement the run waits (bounded)
for the shared machine to be nearly idle, and records how busy it was. Seeder
and leecher CPU time over each round is reported, to tell CPU-bound from
waiting.

Flags for experiments (not what a node does): `--set NAME=VALUE` overrides a
session setting in every peer, `--disk-io` picks libtorrent's disk backend,
`--piece-kib` forces a piece size (the tracker is then started with the same
rule), `--hybrid` uses v1+v2 metainfo.

Prints a table and writes bench/results/peer.json. Every process it starts is
ended by its pid when it finishes, fails or is interrupted.

    .venv/bin/python -m bench.peer [--size-mib 200] [--runs 5] [--leechers 4]

The package: `worker` (the peer process), `rounds` (the timed rounds),
`cluster` (the trackers, and who each peer is there), `__main__` (setup,
the run, the report). Processes start through harness/,
the machine-busy formula is bench/machine.py's; none of it imports tests/.
"""
