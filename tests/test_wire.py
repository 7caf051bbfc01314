"""Control messages: encode/decode and their type checks (p2preg/core/wire.py)."""

from __future__ import annotations

import msgpack
import pytest

from p2preg.core import wire


def test_round_trip_every_message() -> None:
    messages: list[wire.Message] = [
        wire.PublishMetainfo("node-a", 10, b"d4:infodee"),
        wire.MetainfoRecord("sha256:" + "a" * 64, 10, b"x", [b"\x01" * 20]),
        wire.ReportBad("node-a", b"\x02" * 20, "pieces failed", 10, b"y"),
        wire.LeaseRequest("node-a", 5, 2.5),
        wire.LeaseRequest("node-a", 5, 2.5, "sha256:" + "c" * 64, 3),
        wire.LeaseRenew("abc", 7, None),
        wire.LeaseRelease("abc"),
        wire.LeaseReply(wire.LeaseStatus.WAIT, None, 30.0, 4.0, "node-b", 100, 200, None),
        wire.ErrorReply("not_found", "nope"),
    ]
    for message in messages:
        assert wire.decode(type(message), wire.encode(message)) == message


def test_defaults_fill_missing_optional_fields_and_unknown_keys_are_ignored() -> None:
    data = msgpack.packb({"node": "n", "from_the_future": 1}, use_bin_type=True)
    assert wire.decode(wire.LeaseRequest, data) == wire.LeaseRequest("n", None, 0.0)


def test_int_is_accepted_where_float_is_expected() -> None:
    data = msgpack.packb({"node": "n", "wait_s": 3}, use_bin_type=True)
    assert wire.decode(wire.LeaseRequest, data).wait_s == 3.0


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"size": 1, "metainfo": b"x"}, "lacks 'node'"),
        ({"node": "n", "size": "1", "metainfo": b"x"}, "size must be int"),
        ({"node": "n", "size": True, "metainfo": b"x"}, "must be an integer"),
        ({"node": "n", "size": 1, "metainfo": "text"}, "metainfo must be bytes"),
        ({"node": "", "size": 1, "metainfo": b"x"}, "1 to 128"),
        ({"node": "n" * 129, "size": 1, "metainfo": b"x"}, "1 to 128"),
        # Found by tests/test_fuzz_tracker.py: SQLite cannot store these (a 500).
        ({"node": "n", "size": 2**63, "metainfo": b"x"}, "size is out of range"),
        ({"node": "n", "size": 2**64 - 1, "metainfo": b"x"}, "size is out of range"),
    ],
)
def test_decode_refuses_wrong_types(payload: dict[str, object], message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(wire.PublishMetainfo, msgpack.packb(payload, use_bin_type=True))


def test_decode_refuses_non_msgpack_and_non_maps_and_unknown_enum() -> None:
    with pytest.raises(wire.WireError, match="not msgpack"):
        wire.decode(wire.LeaseRelease, b"\xc1")
    with pytest.raises(wire.WireError, match="map"):
        wire.decode(wire.LeaseRelease, msgpack.packb([1, 2]))
    with pytest.raises(wire.WireError, match="unknown value"):
        wire.decode(wire.LeaseReply, msgpack.packb({"status": "maybe"}))
    with pytest.raises(wire.WireError, match="list"):
        wire.decode(
            wire.MetainfoRecord,
            msgpack.packb({"digest": "d", "size": 1, "metainfo": b"", "info_hashes": b""}),
        )
