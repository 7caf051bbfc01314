"""BEP 15 packets, BEP 41 URL data and connection ids (tracker/udp.py)."""

from __future__ import annotations

import struct

import pytest

from p2preg.core.errors import InvalidRequest
from tracker import udp
from tracker.announce import AnnounceResponse, Event, SwarmStats

IH = bytes(range(20))
PID = bytes(range(100, 120))


def announce_packet(
    connection_id: int = 7, *, event: int = 2, numwant: int = -1, ip: int = 0, options: bytes = b""
) -> bytes:
    fixed = struct.pack(
        ">QII20s20sQQQIIIiH",
        connection_id,
        1,
        99,
        IH,
        PID,
        10,
        20,
        30,
        event,
        ip,
        0,
        numwant,
        6881,
    )
    return fixed + options


def test_connect() -> None:
    req = udp.parse_request(struct.pack(">QII", udp.PROTOCOL_ID, 0, 1234))
    assert req == udp.Connect(1234)
    assert udp.encode_connect(1234, 42) == struct.pack(">IIQ", 0, 1234, 42)
    with pytest.raises(InvalidRequest, match="protocol id"):
        udp.parse_request(struct.pack(">QII", 1, 0, 1234))


def test_announce_with_bep41_token() -> None:
    url = b"/announce?token=s%3Dcret"
    options = b"\x01" + bytes([2, 10]) + url[:10] + bytes([2, len(url) - 10]) + url[10:] + b"\x00"
    req = udp.parse_request(announce_packet(options=options))
    assert isinstance(req, udp.Announce)
    r = req.request
    assert (req.connection_id, req.transaction_id) == (7, 99)
    assert (r.info_hash, r.peer_id, r.downloaded, r.left, r.uploaded) == (IH, PID, 10, 20, 30)
    assert r.event is Event.STARTED and r.numwant is None and r.port == 6881
    assert r.token == b"s=cret" and r.claimed_ip is None


def test_announce_without_options_has_no_token_and_claimed_ip_is_decoded() -> None:
    req = udp.parse_request(announce_packet(ip=0x0A000001, numwant=30))
    assert isinstance(req, udp.Announce)
    assert req.request.token is None
    assert req.request.claimed_ip == "10.0.0.1" and req.request.numwant == 30


@pytest.mark.parametrize(
    "packet,message",
    [
        (b"short", "shorter than 16"),
        (announce_packet()[:90], "shorter than 98"),
        (announce_packet(event=9), "event"),
        (announce_packet(options=b"\x02"), "truncated"),
        (struct.pack(">QII", 7, 2, 1) + b"x" * 21, "whole 20-byte"),
        (struct.pack(">QII", 7, 5, 1), "unknown action"),
    ],
)
def test_malformed_packets(packet: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        udp.parse_request(packet)


def test_scrape_and_replies() -> None:
    req = udp.parse_request(struct.pack(">QII", 7, 2, 5) + IH + b"\x01" * 20)
    assert req == udp.Scrape(7, 5, (IH, b"\x01" * 20))
    assert udp.encode_scrape(5, [SwarmStats(1, 2, 3)]) == struct.pack(">IIIII", 2, 5, 1, 3, 2)
    v4 = bytes([127, 0, 0, 1, 0x1A, 0xE1])
    v6 = bytes(16) + b"\x1a\xe1"
    resp = AnnounceResponse(60, 15, 2, 3, [v4, v6])
    assert udp.encode_announce(9, resp, ipv6=False) == struct.pack(">IIIII", 1, 9, 60, 3, 2) + v4
    assert udp.encode_announce(9, resp, ipv6=True).endswith(v6)
    assert udp.encode_error(9, "no") == struct.pack(">II", 3, 9) + b"no"
    assert udp.transaction_id(struct.pack(">QII", 0, 0, 77)) == 77
    assert udp.transaction_id(b"x") is None


def test_connection_ids_are_bound_to_ip_and_expire() -> None:
    ids = udp.ConnectionIds(b"k" * 32)
    cid = ids.issue("127.0.0.1", 1000.0)
    assert ids.valid(cid, "127.0.0.1", 1000.0)
    assert ids.valid(cid, "127.0.0.1", 1000.0 + udp.ID_WINDOW_S)  # still the window after
    assert not ids.valid(cid, "127.0.0.1", 1000.0 + 2 * udp.ID_WINDOW_S)
    assert not ids.valid(cid, "127.0.0.2", 1000.0)
    assert not udp.ConnectionIds(b"j" * 32).valid(cid, "127.0.0.1", 1000.0)
