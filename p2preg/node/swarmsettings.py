"""The node's libtorrent settings: a private swarm at LAN speed.

Owns the settings pack every session of the node starts with (swarm.py), and
that the benchmarks and tests give their own libtorrent sessions so that they
behave as a node does; each setting's reason is beside it, and
docs/SWARM.md ("libtorrent settings") has the measurements.
"""

from __future__ import annotations

import libtorrent as lt

from p2preg.node.requestqueue import request_queue_settings

MiB = 1024 * 1024


def session_settings(listen: str) -> lt.settings_pack:
    """libtorrent settings for a private, LAN-speed swarm (docs/SWARM.md has the numbers)."""
    return {
        "listen_interfaces": listen,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # uTP over loopback and LAN links was several times slower than TCP.
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        # Nodes behind one address (tests, NAT) are still distinct peers.
        "allow_multiple_connections_per_ip": True,
        "send_buffer_watermark": 4 * MiB,
        "send_buffer_low_watermark": 1 * MiB,
        "max_queued_disk_bytes": 32 * MiB,
        # One disk thread, not libtorrent's 10: every batch of read jobs wakes all
        # idle disk threads (notify_all), and an SSL peer sends 8 KiB TLS records,
        # so a TLS seeder queued one job per record and woke ten threads for it.
        # Measured (docs/BENCHMARKS.md, "The TLS pair"): TLS seeder CPU 3.1-4.1 ->
        # 1.7-1.8 ms/MB, TLS/plain pair 0.49-0.70x -> 0.80-0.97x, plain pair and
        # 1->4 swarm unchanged within noise, fan-out at N = 8 TLS/plain 1.01x.
        "aio_threads": 1,
        "request_queue_time": 1,
        **request_queue_settings(),  # few: libtorrent cancels no end-game copy
        "suggest_mode": lt.suggest_mode_t.suggest_read_cache,
        "unchoke_slots_limit": 64,
        "connections_limit": 400,
        "connection_speed": 200,
        "smooth_connects": False,
        "torrent_connect_boost": 64,
        "close_redundant_connections": True,
        # (tracker_completion_timeout: libtorrent's 30 s lets the relay try each tracker)
        # A peer that has not accepted our connection within 5 s on a cluster's
        # network is gone (default 15 s): it is then reported unreachable
        # within peer_stall_report_s rather than after it (stallreports.py).
        "peer_connect_timeout": 5,
        "min_announce_interval": 5,
        # Ask the tracker again quickly when a download is missing peers.
        "tracker_backoff": 50,
        "alert_mask": (
            lt.alert_category.error
            | lt.alert_category.status
            | lt.alert_category.storage
            | lt.alert_category.peer
            | lt.alert_category.connect  # failed connections: unreachable peers
            | lt.alert_category.tracker
        ),
        "alert_queue_size": 10_000,
        "user_agent": "p2preg",
    }
