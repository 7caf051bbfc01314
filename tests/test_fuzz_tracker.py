"""Hostile input against the tracker: HTTP announce/scrape, the control API, UDP.

A tracker runs as a process (the way operators run it) with a cluster token,
small caps and one published blob whose swarm holds a dozen peers; hypothesis
generates malformed announces (binary info-hashes, missing and duplicate
parameters, huge `numwant`, forged `ip`), scrapes, malformed HTTP, control API
bodies (garbage, wrong types, extreme numbers, oversized), metainfo bombs and
BEP 15 packets, and sends them over raw sockets. Invariants on every answer:
no 5xx; an announce or scrape answer is bencoded; no announce answer holds
more than `max_numwant` peers or a peer at any address but the one the
connections came from (127.0.0.1: nobody here is a trusted `ip=` source); a
control API refusal is a msgpack `ErrorReply`; a UDP reply echoes the
transaction id with a known action. Afterwards the tracker must still run,
answer /healthz, have logged no traceback, and hold no more peers than its caps.

Counts go to bench/results/reliability-tracker.json (docs/RELIABILITY.md).
`FUZZ_SCALE=10` runs ten times as many examples per class.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlsplit

import httpx
import libtorrent as lt
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.node import metric_value
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tests.fixtures.rawhttp import RawResponse, build_request, exchange
from tests.fixtures.reliability import Tally
from tests.tracker_helpers import blob_meta
from tracker import udp

pytestmark = pytest.mark.integration

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = {
    "announce": 200,
    "numwant": 60,
    "forged-ip": 80,
    "scrape": 100,
    "http-protocol": 100,
    "control-body": 150,
    "control-types": 150,
    "metainfo-bomb": 60,
    "udp": 250,
}
TOKEN = "fuzz-token"
# Small caps, so that the fuzz runs into them too.
CAPS = {"max_numwant": 5, "max_peers_per_swarm": 150, "max_peers": 200}
CONFIG = "\n".join(
    [
        *(f"{k} = {v}" for k, v in CAPS.items()),
        "default_numwant = 5",
        "lease_wait_max_s = 0.2",  # long polls must not stall the fuzz
        "max_metainfo_bytes = 262144",
    ]
)
LOCAL = bytes([127, 0, 0, 1])


@dataclass
class Running:
    tracker: TrackerProcess
    host: str
    port: int
    meta: Metainfo
    cid: int  # a UDP connection id for 127.0.0.1
    tally: Tally

    @property
    def info_hash(self) -> bytes:
        return self.meta.swarm_keys[0]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("fuzz-tracker")
    config = base / "tracker.toml"
    config.write_text(CONFIG + "\n")
    meta = blob_meta(base)
    digest = meta.digest
    tally = Tally("tracker", f"FUZZ_SCALE={SCALE:g} .venv/bin/pytest -q tests/test_fuzz_tracker.py")
    with open_tracker(base / "tracker", token=TOKEN, args=("--config", str(config))) as tracker:
        parts = urlsplit(tracker.url)
        host, port = parts.hostname or "", parts.port or 0
        r = control(host, port, b"POST", f"/v1/leases/{digest}".encode(),
                    wire.encode(wire.LeaseRequest("fuzz", meta.size)))  # fmt: skip
        assert r.status == 200, r.raw[:300]
        r = control(host, port, b"PUT", f"/v1/metainfo/{digest}".encode(),
                    wire.encode(wire.PublishMetainfo("fuzz", meta.size, meta.data)))  # fmt: skip
        assert r.status == 201, r.raw[:300]
        run = Running(tracker, host, port, meta, udp_connect(host, port), tally)
        for n in range(12):  # a swarm bigger than max_numwant
            answer = announce(run, announce_query(run.info_hash, n, left=n % 2))
            assert b"failure reason" not in answer, answer
        yield run
    tally.extra["examples_per_class"] = {k: round(v * SCALE) for k, v in EXAMPLES.items()}
    tally.extra["caps"] = CAPS
    tally.write()


def fuzz_settings(cls: str) -> settings:
    return settings(
        max_examples=max(1, round(EXAMPLES[cls] * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# -- talking to it ------------------------------------------------------------------------


def control(
    host: str, port: int, method: bytes, target: bytes, body: bytes = b"", token: str | None = TOKEN
) -> RawResponse:
    headers = [(b"Content-Type", wire.CONTENT_TYPE.encode())]
    if token is not None:
        headers.append((b"Authorization", f"Bearer {token}".encode()))
    return exchange(host, port, build_request(method, target, headers, body=body))


def announce_query(ih: bytes, n: int, *, left: int = 0, extra: str = "") -> bytes:
    """Peer `n`'s announce as node `n<n>`: the tracker keeps one peer per node."""
    q = (
        f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
        f"&port={7000 + n}&uploaded=0&downloaded=0&left={left}&compact=1&token={TOKEN}"
        f"&node=n{n}"
    )
    return (q + extra).encode()


def announce(run: Running, query: bytes) -> bytes:
    r = exchange(run.host, run.port, build_request(b"GET", b"/announce?" + query))
    assert r.status == 200
    return r.body


def udp_connect(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(struct.pack(">QII", udp.PROTOCOL_ID, 0, 7), (host, port))
        action, tid, cid = struct.unpack(">IIQ", sock.recv(2048))
    assert (action, tid) == (0, 7)
    return int(cid)


def check_bittorrent(run: Running, cls: str, target: bytes, r: RawResponse) -> None:
    """An announce or scrape answer: bencoded, with honest and capped peer lists."""
    what = target[:200].decode("latin-1")
    if r.status != 200:
        run.tally.record(cls, r.status if r.status is not None else "none", what)
        assert r.status is None or r.status < 500, f"{r.status} for {what!r}"
        return
    doc: Any = lt.bdecode(r.body)
    assert isinstance(doc, dict), r.body[:200]
    failed = b"failure reason" in doc
    run.tally.record(cls, "200-failure" if failed else "200-peers", what)
    if failed:
        assert doc[b"failure reason"], "an empty failure reason"
        return
    for key in (b"peers", b"peers6"):
        peers = doc.get(key, b"")
        width = 6 if key == b"peers" else 18
        assert len(peers) % width == 0 and len(peers) // width <= CAPS["max_numwant"]
        for i in range(0, len(peers), width):
            # Every connection came from 127.0.0.1 and none of them is trusted.
            assert peers[i : i + 4] == LOCAL, f"a forged address was handed out: {peers!r}"


def send_bittorrent(run: Running, cls: str, target: bytes) -> None:
    r = exchange(run.host, run.port, build_request(b"GET", target))
    check_bittorrent(run, cls, target, r)


# -- announce and scrape ---------------------------------------------------------------

ANNOUNCE_KEYS = [
    "info_hash", "peer_id", "port", "uploaded", "downloaded", "left", "event", "compact",
    "numwant", "token", "ip", "key", "trackerid", "no_peer_id", "supportcrypto",
]  # fmt: skip
NUMBERS = [
    "0", "1", "-1", "65535", "65536", "99999", str(2**63), str(2**64), "9" * 19, "9" * 20,
    "9" * 300, "1e3", " 1", "+1", "0x10", "1_000", "²", "", "-0", "--1", "%00",
]  # fmt: skip
quoted_bytes = st.binary(max_size=48).map(lambda b: quote_from_bytes(b).encode())
# Raw bytes in a query: all but the ones that end a request line.
raw_bytes = st.binary(max_size=32).map(
    lambda b: b.translate(None, b" \r\n").replace(b"#", b"").replace(b"?", b"")
)


@st.composite
def announce_queries(draw: st.DrawFn, run: Running) -> bytes:
    good: dict[str, bytes] = {
        "info_hash": quote_from_bytes(run.info_hash).encode(),
        "peer_id": quote_from_bytes(draw(st.binary(min_size=20, max_size=20))).encode(),
        "port": str(draw(st.integers(1, 65535))).encode(),
        "uploaded": b"0",
        "downloaded": b"0",
        "left": draw(st.sampled_from([b"0", b"1", b"100000"])),
        "event": draw(st.sampled_from([b"", b"started", b"completed", b"stopped", b"paused"])),
        "compact": b"1",
        "token": TOKEN.encode(),
    }
    values = st.one_of(
        st.sampled_from(NUMBERS).map(str.encode),
        quoted_bytes,
        raw_bytes,
        st.sampled_from([b"started", b"STARTED", b"stoppedd", b"0", b"wrong-token", b"%"]),
    )
    pairs: list[tuple[bytes, bytes]] = []
    for key, value in good.items():
        what = draw(st.sampled_from(["keep", "keep", "keep", "drop", "mutate", "twice"]))
        if what == "drop":
            continue
        if what == "mutate":
            value = draw(values)
        pairs.append((key.encode(), value))
        if what == "twice":
            pairs.append((key.encode(), draw(values)))
    extra = draw(st.lists(st.tuples(st.sampled_from(ANNOUNCE_KEYS).map(str.encode), values)))
    pairs += extra
    order = draw(st.permutations(range(len(pairs))))
    return b"&".join(pairs[i][0] + b"=" + pairs[i][1] for i in order)


def test_malformed_announces(running: Running) -> None:
    run = running

    @fuzz_settings("announce")
    @given(announce_queries(run))
    def check(query: bytes) -> None:
        send_bittorrent(run, "announce", b"/announce?" + query)

    check()


def test_huge_numwant_is_capped(running: Running) -> None:
    run = running
    numwants = st.one_of(
        st.integers(0, 2**63).map(str),
        st.sampled_from(["9" * 19, "9" * 20, "-1", "-9" * 10, "1" * 500, "50", "5", "6"]),
    )

    # Peers already in the swarm (re-announces always fit), as leechers: they get peers.
    @fuzz_settings("numwant")
    @given(st.integers(0, 11), numwants)
    def check(n: int, numwant: str) -> None:
        query = announce_query(run.info_hash, n, left=1, extra=f"&numwant={numwant}")
        send_bittorrent(run, "numwant", b"/announce?" + query)

    check()


def test_forged_ip_is_ignored(running: Running) -> None:
    run = running
    addresses = st.one_of(
        st.ip_addresses().map(str),
        st.sampled_from(["10.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "::ffff:10.1.2.3",
                         "example.com", "1.2.3.4:80", "", "%00", "1.2.3", "999.1.1.1"]),
        st.text(max_size=20).map(lambda t: quote(t, safe="")),
    )  # fmt: skip

    # Peers already in the swarm: an honoured `ip=` would move them, for all to see.
    @fuzz_settings("forged-ip")
    @given(st.integers(0, 11), addresses, st.sampled_from([0, 1]))
    def check(n: int, ip: str, left: int) -> None:
        query = announce_query(run.info_hash, n, left=left, extra=f"&ip={ip}&numwant=200")
        send_bittorrent(run, "forged-ip", b"/announce?" + query)

    check()
    # Whoever asks now is told of 127.0.0.1 peers only.
    answer: Any = lt.bdecode(announce(run, announce_query(run.info_hash, 1, left=1)))
    peers = answer[b"peers"]
    assert peers and all(peers[i : i + 4] == LOCAL for i in range(0, len(peers), 6))


def test_malformed_scrapes(running: Running) -> None:
    run = running
    hashes = st.one_of(
        st.just(quote_from_bytes(run.info_hash).encode()),
        st.binary(min_size=20, max_size=20).map(lambda b: quote_from_bytes(b).encode()),
        quoted_bytes,
        raw_bytes,
    )

    @fuzz_settings("scrape")
    @given(st.lists(hashes, max_size=80), st.sampled_from([TOKEN, "", "nope", None]))
    def check(ihs: list[bytes], token: str | None) -> None:
        query = b"&".join(b"info_hash=" + h for h in ihs)
        if token is not None:
            query += b"&token=" + token.encode()
        send_bittorrent(run, "scrape", b"/scrape?" + query)

    check()


PROTOCOL = [
    b"GET /announce HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /announce?info_hash=x HTTP/1.1\r\nHost: x\r\n\r\nGET /scrape HTTP/1.1\r\n\r\n",
    b"GET /announce?a=b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"GET /announce HTTP/1.0\r\n\r\n",
    b"GET /announce\r\n\r\n",
    b"GET /announce HTTP/1.1\r\n" + b"X: y\r\n" * 3000 + b"\r\n",
    b"GET /announce?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  /announce  HTTP/1.1\r\n\r\n",
    b"GET /announce HTTP/1.1\nHost: x\n\n",
    b"GET /scrape?info_hash=%00 HTTP/2.0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),
    b"POST /announce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET http://tracker/announce?info_hash=a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /announce/../v1/metainfo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/status?limit=%C2%B2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b"\r\n\r\n",
    b"\r\n\r\n",
]


def test_malformed_http(running: Running) -> None:
    run = running
    raws = st.one_of(
        st.sampled_from(PROTOCOL),
        st.binary(max_size=300),
        st.tuples(st.binary(max_size=200), st.binary(max_size=50)).map(
            lambda p: b"GET /announce?" + p[0].translate(None, b" \r\n") + b" HTTP/1.1\r\n\r\n"
        ),
    )

    @fuzz_settings("http-protocol")
    @given(raws)
    def check(raw: bytes) -> None:
        r = exchange(run.host, run.port, raw, half_close=True, timeout_s=20)
        what = raw[:200].decode("latin-1")
        if r.status == 501 and b"transfer-encoding" in raw.lower():
            run.tally.record("http-protocol", "501-unknown-transfer-coding", what)
            return
        run.tally.record("http-protocol", r.status if r.status is not None else "none", what)
        assert r.status is None or r.status < 500, f"{r.status} for {what!r}"

    check()


# -- the control API ---------------------------------------------------------------------

huge_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
floats = st.one_of(
    st.floats(), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0])
)
scalars = st.one_of(
    st.none(), st.booleans(), huge_ints, floats, st.text(max_size=40), st.binary(max_size=40)
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = {
    "PublishMetainfo": ["node", "size", "metainfo"],
    "ReportBad": ["node", "info_hash", "reason", "size", "metainfo"],
    "LeaseRequest": ["node", "size", "wait_s", "group", "order"],
    "LeaseRenew": ["lease_id", "bytes_done", "size", "node"],
    "LeaseRelease": ["lease_id", "node"],
}
# Values of each field's own type, from ordinary to extreme: most messages get
# past the type checks, so the values reach the service and the store.
texts = st.one_of(
    st.text(min_size=1, max_size=20),
    st.sampled_from(["", "n" * 128, "n" * 129, "r" * 1025, "\x00", "\ud7ff" * 64]),
)
RIGHT_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "node": texts,
    "reason": texts,
    "lease_id": texts,
    "size": st.one_of(st.none(), huge_ints),
    "bytes_done": huge_ints,
    "wait_s": st.one_of(floats, huge_ints),
    "group": st.one_of(st.none(), texts),
    "order": huge_ints,
    "metainfo": st.binary(max_size=200),
    "info_hash": st.binary(max_size=40),
}


def routes(run: Running) -> st.SearchStrategy[tuple[bytes, str, str]]:
    """(method, path, message type) of every control route, with odd digests too."""
    digests = st.one_of(
        st.just(str(run.meta.digest)),
        st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
        st.sampled_from(["md5:abc", "sha256:", "sha256:" + "A" * 64, "..", "%2e%2e", "x" * 500]),
        st.text(max_size=30),
    )
    shapes = [
        (b"PUT", "/v1/metainfo/{}", "PublishMetainfo"),
        (b"GET", "/v1/metainfo/{}", "PublishMetainfo"),
        (b"POST", "/v1/metainfo/{}/bad", "ReportBad"),
        (b"POST", "/v1/leases/{}", "LeaseRequest"),
        (b"PUT", "/v1/leases/{}", "LeaseRenew"),
        (b"POST", "/v1/leases/{}/release", "LeaseRelease"),
        (b"DELETE", "/v1/metainfo/{}", "PublishMetainfo"),
        (b"PATCH", "/v1/leases/{}", "LeaseRenew"),
        (b"GET", "/v1/status?limit={}", "LeaseRelease"),
    ]
    return st.builds(
        lambda shape, d: (shape[0], shape[1].format(quote(d, safe=":")), shape[2]),
        st.sampled_from(shapes),
        digests,
    )


def check_control(run: Running, cls: str, what: str, r: RawResponse) -> None:
    run.tally.record(cls, r.status if r.status is not None else "none", what)
    assert r.status is not None, f"no answer to {what!r}"
    assert r.status < 500, f"{r.status} for {what!r}: {r.body[:300]!r}"
    if r.status >= 400 and (r.header("Content-Type") or b"").startswith(b"application/msgpack"):
        reply = wire.decode(wire.ErrorReply, r.body)
        assert reply.error and reply.message is not None


def test_control_api_bodies(running: Running) -> None:
    run = running
    bodies = st.one_of(
        st.binary(max_size=300),
        msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        st.sampled_from(
            [
                b"\x91" * 100_000 + b"\xc0",  # 100,000 nested arrays
                b"\xdb\xff\xff\xff\xff",  # a 4 GiB string, announced
                b"\xdf\xff\xff\xff\xff",  # a map of 4 billion entries, announced
                b"\xc1",
                msgpack.packb({"node": "n" * 100_000}),
                b"\x00" * (400 * 1024),  # more than the app takes
            ]
        ),
    )
    tokens = st.sampled_from([TOKEN, TOKEN, TOKEN, None, "wrong", "", "x" * 5000])

    @fuzz_settings("control-body")
    @given(routes(run), bodies, tokens)
    def check(route: tuple[bytes, str, str], body: bytes, token: str | None) -> None:
        method, path, _ = route
        r = control(run.host, run.port, method, path.encode(), body, token)
        check_control(run, "control-body", f"{method.decode()} {path[:100]} {body[:60]!r}", r)

    check()


def test_control_api_field_types(running: Running) -> None:
    run = running

    @st.composite
    def messages(draw: st.DrawFn) -> tuple[bytes, str, bytes]:
        method, path, kind = draw(routes(run))
        doc: dict[str, Any] = {}
        for name in FIELDS[kind]:
            if draw(st.integers(0, 9)) == 0:
                continue  # a field left out
            wrong = st.one_of(
                scalars,
                st.text(min_size=100, max_size=3000),
                msgpack_values,
                st.just(run.meta.data),
                st.just(run.info_hash),
            )
            doc[name] = draw(wrong if draw(st.integers(0, 3)) == 0 else RIGHT_TYPE[name])
        return method, path, msgpack.packb(doc, use_bin_type=True)

    @fuzz_settings("control-types")
    @given(messages())
    def check(message: tuple[bytes, str, bytes]) -> None:
        method, path, body = message
        r = control(run.host, run.port, method, path.encode(), body)
        check_control(run, "control-types", f"{method.decode()} {path[:100]} {body[:120]!r}", r)

    check()


def _bombs(meta: Metainfo) -> list[bytes]:
    top: Any = lt.bdecode(meta.data)
    big_layers = dict(top)
    big_layers[b"piece layers"] = {bytes(32): os.urandom(32) * 5000}
    many_layers = dict(top)
    many_layers[b"piece layers"] = {os.urandom(32): os.urandom(32) for _ in range(3000)}
    wide_info = dict(top)
    wide_info[b"info"] = {**top[b"info"], **{b"k%d" % i: i for i in range(5000)}}
    deep_tree = dict(top)
    deep_tree[b"info"] = {**top[b"info"], b"file tree": {b"a": {b"a": {b"a": {b"": {}}}}}}
    return [
        b"l" * 100_000 + b"e" * 100_000,
        b"d1:a" * 50_000 + b"e" * 50_000,
        b"d4:infoi" + b"9" * 100_000 + b"ee",
        b"d4:info99999999999999999999:xe",
        b"l" + b"i1e" * 80_000 + b"e",
        b"d" + b"".join(b"%d:%de0:" % (len(str(i)), i) for i in range(20_000)) + b"e",
        lt.bencode(big_layers),
        lt.bencode(many_layers),
        lt.bencode(wide_info),
        lt.bencode(deep_tree),
        meta.data + b"trailing",
        meta.data[:-1],
        b"",
    ]


def test_metainfo_bombs(running: Running) -> None:
    run = running
    bombs = _bombs(run.meta)

    def flip(data: bytes, at: int, bit: int) -> bytes:
        out = bytearray(data)
        out[at % len(out)] ^= 1 << bit
        return bytes(out)

    metainfo = st.one_of(
        st.sampled_from(bombs),
        st.builds(flip, st.just(run.meta.data), st.integers(0, 10**6), st.integers(0, 7)),
        st.integers(1, len(run.meta.data) - 1).map(lambda k: run.meta.data[:k]),
        st.just(run.meta.data + b"x" * 300_000),  # larger than max_metainfo_bytes
    )
    sizes = st.one_of(st.just(run.meta.size), huge_ints)
    route = st.sampled_from(["/v1/metainfo/{}", "/v1/metainfo/{}/bad"])

    @fuzz_settings("metainfo-bomb")
    @given(metainfo, sizes, route)
    def check(data: bytes, size: int, path: str) -> None:
        target = path.format(run.meta.digest)
        if target.endswith("/bad"):
            msg: wire.Message = wire.ReportBad("fuzz", run.info_hash, "fuzz", size, data)
            method = b"POST"
        else:
            msg, method = wire.PublishMetainfo("fuzz", size, data), b"PUT"
        r = control(run.host, run.port, method, target.encode(), wire.encode(msg))
        check_control(run, "metainfo-bomb", f"{target} size={size} {data[:60]!r}", r)
        # The one good metainfo stays filed: a bomb never replaces it.
        assert r.status in (200, 400, 404, 409, 413, 422), r.status

    check()


# -- UDP (BEP 15) ----------------------------------------------------------------------------


@st.composite
def udp_packets(draw: st.DrawFn, run: Running) -> bytes:
    tid = draw(st.integers(0, 2**32 - 1))
    cid = draw(st.sampled_from([run.cid, run.cid, run.cid, run.cid ^ 1, 0, udp.PROTOCOL_ID]))
    kind = draw(st.sampled_from(["announce", "announce", "scrape", "connect", "action", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "connect":
        head = struct.pack(">QII", draw(st.sampled_from([udp.PROTOCOL_ID, 0, 1])), 0, tid)
        return head + draw(st.binary(max_size=8))
    if kind == "action":
        return struct.pack(">QII", cid, draw(st.integers(3, 2**32 - 1)), tid)
    if kind == "scrape":
        n = draw(st.integers(0, 80))
        body = run.info_hash * n + draw(st.binary(max_size=25))
        return struct.pack(">QII", cid, udp.SCRAPE, tid) + body
    fixed = struct.pack(
        ">QII20s20sQQQIIIiH",
        cid,
        udp.ANNOUNCE,
        tid,
        draw(st.sampled_from([run.info_hash, run.info_hash, bytes(20)])),
        # Mostly peers already in the swarm (re-announces fit under the caps).
        draw(
            st.one_of(
                st.integers(0, 11).map(lambda n: bytes([n]) * 20),
                st.binary(min_size=20, max_size=20),
            )
        ),
        draw(st.integers(0, 2**64 - 1)),  # downloaded
        draw(st.sampled_from([1, 1, 0, 2**64 - 1])),  # left
        draw(st.integers(0, 2**64 - 1)),  # uploaded
        draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))),  # event
        # The BEP 15 IP field: forged, it must be ignored like HTTP's `ip=`.
        draw(st.sampled_from([0, 0x0A000001, 0xFFFFFFFF, draw(st.integers(0, 2**32 - 1))])),
        draw(st.integers(0, 2**32 - 1)),  # key
        draw(st.integers(-(2**31), 2**31 - 1)),  # numwant
        draw(st.integers(0, 65535)),  # port
    )
    good = f"/announce?token={TOKEN}".encode()
    options = draw(
        st.one_of(
            st.just(bytes([2, len(good)]) + good + b"\x00"),
            st.binary(max_size=60),
            st.just(b"\x02\xff" + good),  # a length past the end
            st.just(b"\x01" * 40 + b"\x02"),  # truncated
            st.just(b"\x02\x05/ann" + b"\x02\x20ounce?token=" + TOKEN.encode()),
        )
    )
    cut = draw(st.integers(0, 100))
    packet = fixed + options
    return packet[: len(packet) - cut] if cut < 10 else packet


def test_udp_packets(running: Running) -> None:
    run = running

    @fuzz_settings("udp")
    @given(udp_packets(run))
    def check(packet: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(packet, (run.host, run.port))
            if len(packet) < 16:
                # Too short to address a reply: BEP 15 trackers stay silent.
                run.tally.record("udp", "silent", packet.hex())
                return
            reply = sock.recv(4096)
        action, tid = struct.unpack_from(">II", reply)
        label = {0: "connected", 1: "announced", 2: "scraped", 3: "error"}.get(action, action)
        run.tally.record("udp", f"reply-{label}", packet[:40].hex())
        assert tid == struct.unpack_from(">I", packet, 12)[0]
        assert action in (udp.CONNECT, udp.ANNOUNCE, udp.SCRAPE, udp.ERROR)
        if action == udp.ANNOUNCE:
            peers = reply[20:]
            assert len(peers) % 6 == 0 and len(peers) // 6 <= CAPS["max_numwant"]
            assert all(peers[i : i + 4] == LOCAL for i in range(0, len(peers), 6)), peers

    check()


# -- afterwards -------------------------------------------------------------------------------


def test_bugs_found_by_fuzzing_stay_fixed(running: Running) -> None:
    run = running
    # A lease record with a number SQLite cannot store: an OverflowError, a 500.
    for field in ("size",):
        for value in (2**63, 2**64 - 1):
            body = msgpack.packb({"node": "n", field: value})
            digest = Digest.of(f"{field}{value}".encode())
            r = control(run.host, run.port, b"POST", f"/v1/leases/{digest}".encode(), body)
            check_control(run, "control-types", f"lease {field}={value}", r)
            assert r.status == 400
    # `limit=²`: str.isdigit() said yes, int() said no.
    r = control(run.host, run.port, b"GET", b"/v1/status?limit=%C2%B2")
    check_control(run, "control-types", "status limit=²", r)
    assert r.status == 400
    # hypercorn let a BusyResourceError out of a connection; a few stopped the server.
    bad_chunk = b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
    for _ in range(20):
        exchange(run.host, run.port, bad_chunk, half_close=True)
    run.tracker.process.check_running()


def test_tracker_stays_healthy_and_bounded(running: Running) -> None:
    """Runs last: the tracker is up, logged no traceback, and holds no more than its caps."""
    run = running
    run.tracker.process.check_running()
    with httpx.Client(trust_env=False, timeout=30) as http:
        assert http.get(f"{run.tracker.url}/healthz").status_code == 200
        metrics = http.get(f"{run.tracker.url}/metrics").text
    log = run.tracker.process.log_path.read_text("utf-8", "replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    peers = metric_value(metrics, "p2preg_tracker_peers")
    assert 0 < peers <= CAPS["max_peers_per_swarm"] <= CAPS["max_peers"]
    assert metric_value(metrics, "p2preg_tracker_swarms") == 1
    assert metric_value(metrics, "p2preg_tracker_metainfo") == 1
    run.tally.extra["peers_after"] = peers
    run.tally.extra["swarms_after"] = metric_value(metrics, "p2preg_tracker_swarms")
    run.tally.extra["metainfo_after"] = metric_value(metrics, "p2preg_tracker_metainfo")
    run.tally.extra["log_bytes"] = len(log)
