"""Announce fronts, sans-IO (tracker/fronts.py), forwarded and relayed batches.

The batch a standby forwards round-trips, and the serving replica refuses
anything else with `InvalidRequest` (a path that is not an announce or scrape,
an oversized query, an address that is no IP, a batch too big or empty,
answers of the wrong count). A batch applied by `answer_batch` gets exactly
what each node would have got straight from the tracker. A node relay's batch
(`decode_relayed`, `answer_relayed`) is applied under the identity and address
of the connection it came on, and a malformed one is refused.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote_from_bytes

import libtorrent as lt
import msgpack
import pytest

from p2preg.core import errors
from tests.tracker_helpers import blob_meta, make_tracker, publish_as_holder
from tracker import bittorrent, fronts


def item(query: bytes = b"info_hash=x", *, ip: str = "10.0.0.1",
         identity: str | None = None, path: bytes = b"/announce") -> fronts.Forwarded:  # fmt: skip
    return fronts.Forwarded(path, query, ip, identity)


def test_a_batch_round_trips_and_anything_else_is_refused() -> None:
    batch = [item(identity="n1"), item(b"", ip="::1", path=b"/scrape")]
    assert fronts.decode_batch(fronts.encode_batch(batch)) == batch
    bad = [
        b"\xc1",  # not msgpack
        msgpack.packb([]),
        fronts.encode_batch([item()] * (fronts.BATCH_MAX + 1)),
        fronts.encode_batch([item(path=b"/v1/leases/x")]),
        fronts.encode_batch([item(b"x" * 4097)]),
        fronts.encode_batch([item(ip="somewhere")]),
        fronts.encode_batch([item(identity="")]),
        msgpack.packb([[b"/announce", "text, not bytes", "10.0.0.1", None]]),
        msgpack.packb([[b"/announce", b"", "10.0.0.1"]]),
    ]
    for body in bad:
        with pytest.raises(errors.InvalidRequest):
            fronts.decode_batch(body)
    answers = [b"d8:intervali60ee", b""]
    assert fronts.decode_answers(fronts.encode_answers(answers), 2) == answers
    with pytest.raises(errors.InvalidRequest):
        fronts.decode_answers(fronts.encode_answers(answers), 3)


async def test_a_forwarded_batch_gets_what_the_nodes_would_have_got(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    await publish_as_holder(tracker, meta, "a")
    (ih,) = meta.swarm_keys

    def query(node: str, port: int, left: int = 1) -> bytes:
        return (f"info_hash={quote_from_bytes(ih)}&peer_id={node * 20}&port={port}"
                f"&uploaded=0&downloaded=0&left={left}&node={node}").encode()  # fmt: skip

    # a seeds (through a front), b asks straight, c through a front: one swarm.
    seeded, unknown = fronts.answer_batch(tracker, [
        item(query("a", 7001, 0), ip="10.0.0.1"),
        item(query("a", 7001).replace(quote_from_bytes(ih).encode(), b"%00" * 20)),
    ])  # fmt: skip
    assert b"failure reason" not in lt.bdecode(seeded)
    assert b"unregistered info_hash" in lt.bdecode(unknown)[b"failure reason"]
    straight = bittorrent.http_body(tracker, b"/announce", query("b", 7002), "10.0.0.2")
    assert straight is not None and b"failure reason" not in lt.bdecode(straight)
    (fronted,) = fronts.answer_batch(tracker, [item(query("c", 7003), ip="10.0.0.3")])
    peers = lt.bdecode(fronted)[b"peers"]
    assert bytes([10, 0, 0, 1]) + (7001).to_bytes(2, "big") in [peers[i : i + 6] for i in (0, 6)]
    assert all(tracker.peers.peer(str(meta.digest), n) is not None for n in ("a", "b", "c"))


async def test_a_relayed_batch_is_applied_under_the_connection_s_identity(
    tmp_path: Path,
) -> None:
    tracker = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    await publish_as_holder(tracker, meta, "a")
    (ih,) = meta.swarm_keys
    q = (f"info_hash={quote_from_bytes(ih)}&peer_id={'p' * 20}&port=7001"
         "&uploaded=0&downloaded=0&left=1").encode()  # fmt: skip
    body = msgpack.packb([q, q.replace(b"port=7001", b"port=7002")], use_bin_type=True)
    queries = fronts.decode_relayed(body)
    # Two announces of one identity are one peer (the later port), at the connection's address.
    items = fronts.relayed(queries, "10.0.0.9", "n9")
    assert [i.identity for i in items] == ["n9", "n9"] and items[0].client_ip == "10.0.0.9"
    answers = fronts.answer_relayed(tracker, items)
    assert all(b"failure reason" not in lt.bdecode(a) for a in answers)
    assert tracker.peers.peer(str(meta.digest), "n9") is not None
    assert tracker.metrics.relayed.labels("applied")._value.get() == 2
    assert tracker.metrics.relayed_batches._value.get() == 1
    too_many = msgpack.packb([q] * (fronts.BATCH_MAX + 1))
    for bad in (b"\xc1", msgpack.packb([]), msgpack.packb(["text"]),
                msgpack.packb([b"x" * 4097]), too_many):  # fmt: skip
        with pytest.raises(errors.InvalidRequest):
            fronts.decode_relayed(bad)
