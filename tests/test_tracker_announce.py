"""HTTP announce/scrape parsing and bencoded answers (tracker/announce.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest

from p2preg.core.errors import InvalidRequest
from tracker.announce import (
    AnnounceResponse,
    Event,
    SwarmStats,
    encode_announce,
    encode_failure,
    encode_scrape,
    parse_announce,
    parse_scrape,
    split_target,
)

IH = bytes(range(20))
PID = b"-LT2110-" + bytes(range(200, 212))


def q(**fields: object) -> bytes:
    parts = []
    for key, value in fields.items():
        text = quote_from_bytes(value) if isinstance(value, bytes) else str(value)
        parts.append(f"{key}={text}")
    return "&".join(parts).encode()


def good(**extra: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        info_hash=IH, peer_id=PID, port=6881, uploaded=0, downloaded=5, left=100, compact=1
    )
    base.update(extra)
    return base


def decoded(data: bytes) -> Any:
    return lt.bdecode(data)


def test_split_target() -> None:
    assert split_target(b"/announce?a=1&b=2") == (b"/announce", b"a=1&b=2")
    assert split_target(b"/scrape") == (b"/scrape", b"")


def test_parse_announce_like_libtorrent_sends_it() -> None:
    req = parse_announce(q(**good(event="started", numwant=50, key="ab12", token="s%20t")))
    assert req.info_hash == IH and req.peer_id == PID
    assert (req.port, req.downloaded, req.left, req.uploaded) == (6881, 5, 100, 0)
    assert req.event is Event.STARTED and req.numwant == 50
    assert req.token == b"s t" and req.claimed_ip is None


@pytest.mark.parametrize(
    "event,expected",
    [
        ("completed", Event.COMPLETED),
        ("stopped", Event.STOPPED),
        ("", Event.NONE),
        ("paused", Event.NONE),
    ],
)
def test_events(event: str, expected: Event) -> None:
    assert parse_announce(q(**good(event=event))).event is expected


def test_numwant_absent_or_negative_means_default_and_ip_is_only_claimed() -> None:
    assert parse_announce(q(**good())).numwant is None
    assert parse_announce(q(**good(numwant=-1))).numwant is None
    assert parse_announce(q(**good(ip="10.0.0.9"))).claimed_ip == "10.0.0.9"


def test_node_is_the_asserted_name_checked_like_a_control_message() -> None:
    assert parse_announce(q(**good())).node is None
    assert parse_announce(q(**good(node="n%C3%A9-1"))).node == "né-1"
    with pytest.raises(InvalidRequest, match="node must be UTF-8"):
        parse_announce(q(**good(node="%FF")))
    with pytest.raises(InvalidRequest, match="1 to 128 characters"):
        parse_announce(q(**good(node="x" * 129)))


@pytest.mark.parametrize(
    "fields,message",
    [
        (good(info_hash=IH[:19]), "info_hash must be 20 bytes"),
        ({k: v for k, v in good().items() if k != "info_hash"}, "info_hash"),
        (good(peer_id=b"short"), "peer_id must be 20 bytes"),
        (good(port=0), "port"),
        (good(port=70000), "port"),
        (good(port="12a"), "port must be a non-negative integer"),
        (good(left="-1"), "left must be a non-negative integer"),
        ({k: v for k, v in good().items() if k != "left"}, "missing left"),
        (good(event="finished"), "event"),
        (good(compact=0), "compact"),
        (good(numwant="+5"), "numwant"),
    ],
)
def test_malformed_announces_are_refused_with_a_reason(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_announce(q(**fields))


def test_oversized_query_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="too long"):
        parse_announce(q(**good()) + b"&pad=" + b"x" * 5000)


def test_parse_scrape_takes_repeated_info_hashes() -> None:
    other = b"\xff" * 20
    query = b"info_hash=" + quote_from_bytes(IH).encode() + b"&info_hash="
    query += quote_from_bytes(other).encode() + b"&token=abc"
    req = parse_scrape(query, max_hashes=8)
    assert req.info_hashes == (IH, other) and req.token == b"abc"
    with pytest.raises(InvalidRequest, match="at least one"):
        parse_scrape(b"token=abc", max_hashes=8)
    with pytest.raises(InvalidRequest, match="at most 1"):
        parse_scrape(query, max_hashes=1)
    with pytest.raises(InvalidRequest, match="20 bytes"):
        parse_scrape(b"info_hash=abc", max_hashes=8)


def test_encode_announce_is_compact_bencode_with_peers6_for_ipv6() -> None:
    v4 = bytes([127, 0, 0, 1]) + (6881).to_bytes(2, "big")
    v6 = bytes(15) + b"\x01" + (6882).to_bytes(2, "big")
    body = decoded(encode_announce(AnnounceResponse(60, 15, 3, 4, [v4, v6])))
    assert body == {
        b"interval": 60,
        b"min interval": 15,
        b"complete": 3,
        b"incomplete": 4,
        b"peers": v4,
        b"peers6": v6,
    }
    only_v4 = decoded(encode_announce(AnnounceResponse(60, 15, 1, 0, [v4])))
    assert b"peers6" not in only_v4


def test_encode_scrape_and_failure() -> None:
    body = decoded(encode_scrape({IH: SwarmStats(2, 5, 9)}))
    assert body == {b"files": {IH: {b"complete": 2, b"incomplete": 5, b"downloaded": 9}}}
    assert decoded(encode_failure("nope")) == {b"failure reason": b"nope"}
