"""Pull fan-out: N hosts pull one image at the same moment, straight from the seed
registry ("direct") and through each host's p2preg node ("p2p"), side by side.

It builds its own cluster on this machine (harness/netns.py): network namespaces
on one bridge, addresses in 198.18.0.0/24, `tc tbf` on every veth in both
directions. The seed registry (Debian's `docker-registry`) sits behind an
upstream link of U Mbit/s; a tracker host is unshaped; each of N node hosts has
a link of B Mbit/s and runs its own containerd (a daemon of its own; `ctr`, which
does the registry HTTP itself, runs in the host's namespace) and, in p2p mode,
its own p2preg node (facade on the host's 127.0.0.1, peers on its 198.18 address).
The registry is named by its IP address in every image reference, so no name is
ever looked up in DNS, and every `hosts.toml` has a working host entry.

Per mode and N it reports the time until the last node finished, p50/p90 of the
per-node pull times, the bytes that crossed the upstream link (the registry
link's tx counter, and the blob bytes the registry itself logged — never our own
metrics), per-node CPU and peak RSS of nodes, containerd and ctr, and, in p2p
mode, where the time went (first copy over U, spread through the swarm, client).

The machine is part of the limit (two cores receive, hash, write, unpack and
serve everything all N hosts move), so the same run measures it, with no
p2preg code involved:

- first copy: one host fetches an S-byte file from nginx on the registry host,
  over the U link (curl, written to disk);
- ring(N): every node host fetches S from nginx on its neighbour, all N at once,
  over their B links — the data movement of a perfectly balanced swarm;
- client(N): all N hosts pull the image at once, with the run's client, from a
  second docker-registry on an unshaped host, over their B links — the network
  plus containerd's own receive/write/unpack work, without U and without p2preg.

bound(N) = first copy + max(ring(N), client(N)): the image must cross U once,
then every host must receive it and hand it to containerd, and the machine does
that no faster than measured (a store-and-forward bound; the targets use it).
Beside it: the network-only bound, first copy + ring(N), with no client work in
it, and floor(N) = max(first copy, ring(N), client(N)), what perfect cut-through
pipelining would allow. docs/BENCHMARKS.md argues the choice.

`--client` says who pulls on each host (clients.py): `ctr` (`ctr images pull`,
which in containerd 1.6 fetches every layer and then unpacks them in turn) or
`cri` (kubelet's PullImage on containerd's CRI plugin, which applies each layer
as it arrives; the daemon then runs in the host's namespace, since it does the
registry HTTP itself). They differ by the unpack containerd can overlap.

`--tls on` runs p2p as a TLS cluster (mode `p2p_tls`): a CA made for the run,
the tracker on HTTPS only with a certificate naming its 198.18 address (IP SAN:
libtorrent checks the hostname), each node with its host's certificate and only
its SSL peer port open. `--tls both` runs p2p and p2p_tls in the same run, on
the same image and shaping, their repeats interleaved, and reports TLS / plain
(the goal: at most 1.05 at N = 8). Plain nodes and tracker in the namespaces
run with `--insecure`, since their addresses are beyond loopback.

Prints progress and tables; writes bench/results/fanout-<time>.json and .png.
Needs root (containerd, and the namespaces; says so and stops otherwise);
`--loopback` runs the same on 127.0.0.1 with no namespaces and no shaping.
Everything it starts is stopped by pid and every namespace removed by name at
the end, also on Ctrl-C, SIGTERM or failure. The machine may be shared, so the
JSON records how busy it was just before each run; `--repeats` runs the short,
CPU-bound runs (client(N), p2p) several times and reports the median.

    .venv/bin/python -m bench.fanout                       # N = 2,4,8, S = 100 MB, L = 4
    .venv/bin/python -m bench.fanout --repeats 3           # medians of 3, ~13 min
    .venv/bin/python -m bench.fanout --nodes 16 --upstream-mbit 100
    .venv/bin/python -m bench.fanout --loopback --nodes 2,4 --size-mb 50
    .venv/bin/python -m bench.fanout --nodes 8 --repeats 3 --tls both   # TLS vs plain, ~10 min
    .venv/bin/python -m bench.fanout --nodes 4,8 --modes p2p --client cri  # kubelet's pull

The package: `settings` (flags, constants), `cluster` (namespaces, shaping,
what runs where, all through harness/), `clients` (one pull per host, timed),
`capacity` (first copy, ring, bound),
`runs` (one measured run), `phases` (where the time went), `document` (the
JSON), `report` (tables, plot), `__main__` (the whole benchmark). None of it
imports tests/; the machine-busy formula is bench/machine.py's, shared with
bench.peer and bench.serve.
"""
