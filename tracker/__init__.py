"""The p2preg tracker: BitTorrent tracker, metainfo registry and upstream leases.

A separate deployable (`p2preg tracker`). Modules, one concern each: `config`
(TrackerConfig), `errors` (the one exception hierarchy), `announce` and `udp`
(sans-IO BitTorrent codecs), `peers` and `handout` (in-memory swarms and who gets
whom), `leases` (upstream-fetch leases), `state` (the persistence seam and its
SQLite store), `service` (the tracker's logic over all of these), `http_listener`
and `udp_listener` (sockets), `server` (the control API app and `serve_tracker`),
`metrics`, `client` (what nodes use) and `cli`.
"""
