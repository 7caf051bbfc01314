"""How fast a node serves a blob it already holds, next to nginx serving the same file.

Starts Debian's `docker-registry` as the seed registry, pushes one random blob
(256 MiB by default) and a manifest referencing it with the registry's
monolithic upload (POST, then PUT `?digest=`), starts a real node
(`python -m p2preg node`) against it, and warms the node by resolving the
manifest and GETting the blob once with its digest checked, so that the blob
is in the node's verified store. It then starts Debian nginx (`sendfile on`,
one worker, `user root`) serving that very stored file, and times whole-blob
GETs from both with one client: a raw socket reading into a reused 1 MiB
buffer, one thread per stream (on this machine as fast as a small C client,
and faster than curl or wrk, which would otherwise be what gets measured).

Rounds alternate nginx and the node (the order flips each round), for 1 stream
and for N concurrent streams (4 by default); in one timed run every stream GETs
the whole blob `--gets` times in a row. Throughput is bytes over wall time,
reported as median and spread, and as the node/nginx ratio of the medians and
of each round's pair. The machine may be shared, so each run waits (bounded)
until the CPUs are nearly idle and records how busy they were. The node's RSS
is taken idle, after the warm-up, and at its peak during the measured node runs
(`VmHWM`, reset through `/proc/PID/clear_refs`, and `VmRSS` sampled every
10 ms), against the bound idle + streams * `stream_chunk_bytes`. `--profile
FILE` then records py-spy's collapsed stacks of the node serving more GETs.

Prints a table and writes bench/results/serve.json. Every process it starts is
stopped by its pid when it finishes, fails or is interrupted.

    .venv/bin/python -m bench.serve [--size-mib 256] [--runs 5] [--streams 4]

The package: `seed` (the blob and its push), `client` (the raw-socket GETs),
`measure` (rounds, RSS, pinning, py-spy), `__main__` (setup, run, report).
Processes start through harness/; the machine-busy formula is bench/machine.py's.
"""
