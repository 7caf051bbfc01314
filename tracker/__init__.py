"""The p2preg tracker: BitTorrent tracker, metainfo registry and upstream leases.

A separate deployable (`p2preg tracker`). Modules, one concern each: `config`
(TrackerConfig); sans-IO protocol codecs `announce` and `udp` (BitTorrent),
`http_parse` and `http_protocol` (HTTP/1.1 requests and framing) and `metainfo`
(torrents); sans-IO state and policy `peers` and `handout` (swarms and who gets
whom), `registry` (metainfo by digest, bad reports), `leases` (the
`LeaseBook`), `lease_rules` (how a lease is judged), `upstream_queue` (which
blob of an image crosses the upstream link next) and `auth` (the cluster token,
trusted `ip=` sources); `state` (the persistence seam and its SQLite store);
`waiters` (long polls) and `hangups` (their clients watched); `lease_desk`
(lease requests, renewals and releases); `coordinator` (`Tracker`, the service
composing all of these); the transports `bittorrent` (announce/scrape/UDP
answers), `http_routes` (every HTTP route, as one table), `http_listener` and
`udp_listener` (sockets); `serve` (`serve_tracker`, the wiring); `metrics`;
`client` (what nodes use, with `metainfo`) and `cli`. The tracker's errors are
`p2preg.core.errors`.
"""
