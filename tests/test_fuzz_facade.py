"""Hostile input against the node's registry facade, over raw HTTP.

A node runs as a process in front of a real docker-registry seed that holds one
small pushed image; hypothesis generates requests class by class — methods,
pushes, names, tags, digests, path traversal, odd encodings, oversized parts,
query parameters, Range, Accept, other headers, and malformed HTTP — and sends
them as raw bytes (httpx would normalise or refuse most of them). The seed is
healthy, so every 5xx is the node's fault. Invariants checked on every answer:
no 5xx; a HEAD carries no body; a JSON error is an OCI error body; a blob
range holds exactly the blob's bytes; a canary file beside the store never
shows up. Afterwards the node must still be running and serving a full,
verified pull, must have logged no traceback, and — from an audit hook loaded
into the node (`sitecustomize`, `sys.addaudithook`) — must never have opened
a file outside its data directory and its own code.

Counts go to bench/results/reliability-facade.json (docs/RELIABILITY.md).
`FUZZ_SCALE=10` runs ten times as many examples per class.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.images import OciLayout, PushedImage
from harness.node import NodeProcess, open_node
from harness.registry import Registry, open_registry
from harness.skopeo import push, skopeo
from p2preg.node.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.conftest import ImageVariant
from tests.fixtures.rawhttp import RawResponse, build_request, exchange
from tests.fixtures.reliability import Tally

pytestmark = pytest.mark.integration

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
# Examples per class; about 1,400 requests in all at scale 1.
EXAMPLES = {
    "method": 80,
    "push": 60,
    "name": 150,
    "tag": 80,
    "digest": 150,
    "traversal": 120,
    "encoding": 100,
    "oversize": 50,
    "query": 120,
    "range": 150,
    "accept": 100,
    "header": 100,
    "protocol": 120,
    "admin": 60,
}
REPOSITORY = "fuzz/image"
ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
# Installed into the node with PYTHONPATH: logs every file it opens or lists.
AUDIT_HOOK = '''\
"""tests/test_fuzz_facade.py: log what this process opens, for the store check."""
import os
import sys

_fd = os.open(os.environ["FUZZ_OPEN_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _hook(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    if path is None or isinstance(path, int):
        return
    try:
        path = os.path.abspath(os.fsdecode(path))
    except Exception:
        path = repr(path)
    os.write(_fd, (event + " " + ascii(path) + "\\n").encode())


sys.addaudithook(_hook)
'''


@dataclass
class Seeded:
    node: NodeProcess
    registry: Registry
    image: PushedImage
    blobs: dict[str, bytes]
    canary: bytes
    canary_paths: tuple[Path, ...]
    open_log: Path
    tally: Tally

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.node.host.rpartition(":")
        return host, int(port)


@pytest.fixture(scope="module")
def seeded(
    tmp_path_factory: pytest.TempPathFactory, image_layouts: dict[ImageVariant, OciLayout]
) -> Iterator[Seeded]:
    base = tmp_path_factory.mktemp("fuzz-facade")
    canary = b"CANARY-" + secrets.token_hex(16).encode()
    workdir = base / "node"
    workdir.mkdir()
    # One beside the data directory (`data/../canary`), one further up.
    canary_paths = (workdir / "canary", base / "canary")
    for path in canary_paths:
        path.write_bytes(canary)
    hook_dir = base / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    open_log = base / "opened.log"
    python_path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    tally = Tally("facade", f"FUZZ_SCALE={SCALE:g} .venv/bin/pytest -q tests/test_fuzz_facade.py")
    layout = image_layouts["single"]
    with (
        open_registry(base / "registry") as registry,
        open_node(
            workdir,
            [registry.url],
            env={"PYTHONPATH": python_path, "FUZZ_OPEN_LOG": str(open_log)},
        ) as node,
    ):
        image = push(layout, registry.host, REPOSITORY)
        blobs = {b.digest: layout.blob_path(b.digest).read_bytes() for b in image.blobs}
        seeded = Seeded(node, registry, image, blobs, canary, canary_paths, open_log, tally)
        pull_and_verify(seeded)
        yield seeded
    tally.extra["examples_per_class"] = {k: round(v * SCALE) for k, v in EXAMPLES.items()}
    tally.write()


def pull_and_verify(s: Seeded) -> None:
    """A whole pull through the node, every byte checked against its digest."""
    s.tally.pulls_attempted += 1
    with httpx.Client(trust_env=False, timeout=60) as http:
        base = f"{s.node.url}/v2/{s.image.repository}"
        r = http.get(f"{base}/manifests/{s.image.tag}", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200, r.text
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == s.image.digest
        verified = len(r.content)
        for blob in s.image.blobs:
            got = http.get(f"{base}/blobs/{blob.digest}")
            assert got.status_code == 200, got.text
            assert "sha256:" + hashlib.sha256(got.content).hexdigest() == blob.digest
            verified += len(got.content)
    s.tally.pulls_completed += 1
    s.tally.bytes_verified += verified


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


# -- sending and the invariants every answer must keep -------------------------------


@dataclass(frozen=True)
class Req:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    raw: bytes | None = None  # the whole request, for malformed HTTP

    def wire(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return build_request(self.method, self.target, self.headers, body=self.body)


def send(s: Seeded, cls: str, req: Req) -> RawResponse:
    data = req.wire()
    host, port = s.address
    # Malformed requests may be incomplete: end our side so the server answers now.
    r = exchange(host, port, data, head=req.method == b"HEAD", half_close=req.raw is not None)
    what = data[:300].decode("latin-1")
    if r.status == 501 and UNKNOWN_CODING.search(data.partition(b"\r\n\r\n")[0]):
        # RFC 9112 §6.1: a transfer coding the server does not implement gets a
        # 501 (from h11, before the app). Counted apart, not as a server error.
        s.tally.record(cls, "501-unknown-transfer-coding", what)
        return r
    s.tally.record(cls, r.status if r.status is not None else "none", what)
    assert r.status is None or r.status < 500, f"{r.status} for {what!r}: {r.body[:300]!r}"
    assert s.canary not in r.raw, f"the canary leaked for {what!r}"
    if req.raw is None:
        # Everything but broken HTTP reaches the app, which always answers.
        assert r.status is not None, f"no answer to {what!r}"
    if r.status is not None and req.method == b"HEAD" and r.status != 101:
        assert r.body == b"", f"a HEAD got a body: {what!r}"
    content_type = r.header("Content-Type") or b""
    length = r.header("Content-Length") or b""
    # A malformed request's answer may be cut short by our early half-close.
    whole = length.isdigit() and len(r.body) == int(length)
    json_error = r.status is not None and r.status >= 400 and req.method != b"HEAD" and whole
    if json_error and content_type.startswith(b"application/json"):
        errors = json.loads(r.body)["errors"]
        assert errors and all(isinstance(e["code"], str) and e["code"] for e in errors)
    return r


UNKNOWN_CODING = re.compile(rb"(?im)^transfer-encoding:(?![ \t]*chunked[ \t]*\r?$)")


def oci_code(r: RawResponse) -> str:
    return str(json.loads(r.body)["errors"][0]["code"])


# -- the parts requests are built from ------------------------------------------------

SAFE = "/:@-._~!$&'()*+,;="
component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:\.|_|__|-+)[a-z0-9]{1,6}){0,2}", fullmatch=True)
good_names = st.one_of(
    st.just(REPOSITORY), st.lists(component, min_size=1, max_size=3).map("/".join)
)
small_text = st.text(max_size=24)
NAME_NEAR_MISSES = [
    "", ".", "..", "a/..", "../a", "a/./b", "-a", "a-", "a..b", "a___b", "_a", "a_", "A",
    "a b", "a\tb", "é", "a\x00b", "a%00b", "a:b", "a@b", "a+b", "a//b", "/a", "a/",
    "fuzz/image/", "fuzz//image", "FUZZ/image", "fuzz/image/blobs", "\uff41", "a\u200bb",
]  # fmt: skip
bad_names = st.one_of(
    good_names.map(str.upper),
    good_names.map(lambda n: n + "/"),
    good_names.map(lambda n: "/" + n),
    good_names.map(lambda n: n.replace("/", "//") if "/" in n else n + "//x"),
    st.sampled_from(NAME_NEAR_MISSES),
    small_text,
    st.integers(250, 4000).map(lambda k: "a" * k),
    st.integers(2, 1100).map(lambda k: "a/" * k + "a"),
)
good_tags = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True)
TAG_NEAR_MISSES = [
    "-x", ".x", "a" * 128, "a" * 129, "a" * 5000, "latest ", "lat%25est", "ü", "x:y",
    "latest%00", "%20", "..", ".", "latest;x", "LATEST", "latest\\", "latest%0d%0aX: y",
]  # fmt: skip
bad_tags = st.one_of(st.sampled_from(TAG_NEAR_MISSES), small_text.filter(bool))
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
ALGORITHMS = ["md5", "sha1", "sha384", "sha3-256", "blake3", "SHA256", "sha256+b64", "a.b_c-d"]
digest_near_misses = st.one_of(
    hex64.map(lambda h: "sha256:" + h),
    st.binary(min_size=64, max_size=64).map(lambda b: "sha512:" + b.hex()),
    st.integers(0, 200).map(lambda k: "sha256:" + "a" * k),
    hex64.map(lambda h: "sha256:" + h.upper()),
    st.just("sha256:" + "g" * 64),
    st.tuples(st.sampled_from(ALGORITHMS), hex64).map(":".join),
    hex64.flatmap(
        lambda h: st.sampled_from(
            [
                "sha256:",
                ":" + h,
                "sha256",
                "sha256::" + h,
                f"sha256:{h}:",
                f"sha256:{h}=",
                f"sha256:{h}%00",
                f"sha256:{h[:-1]}",
                f"sha256:{h}0",
                f"sha256%3a{h}",
                f"sha256:{h}%2f..",
                "sha256:..%2f..%2fcanary",
                f"sha256:{h}/../{h}",
            ]
        )
    ),
    st.tuples(small_text, small_text).map(":".join),
    st.integers(150, 9000).map(lambda k: "sha256:" + "a" * k),
)


def enc(path: str) -> bytes:
    return quote(path, safe=SAFE).encode("ascii")


def get_or_head() -> st.SearchStrategy[bytes]:
    return st.sampled_from([b"GET", b"GET", b"HEAD"])


# -- the tests ----------------------------------------------------------------------------


def paths(s: Seeded) -> list[str]:
    repo, blob = s.image.repository, max(s.image.blobs, key=lambda b: b.size).digest
    return [
        "/v2/",
        f"/v2/{repo}/manifests/{s.image.tag}",
        f"/v2/{repo}/manifests/{s.image.digest}",
        f"/v2/{repo}/blobs/{blob}",
        f"/v2/{repo}/tags/list",
        f"/v2/{repo}/referrers/{s.image.digest}",
    ]


def kinds(s: Seeded) -> st.SearchStrategy[str]:
    """The tail of a route for any name: `/manifests/<ref>`, `/blobs/<digest>`, ..."""
    return st.sampled_from(
        [
            f"/manifests/{s.image.tag}",
            f"/manifests/{s.image.digest}",
            *(f"/blobs/{b.digest}" for b in s.image.blobs),
            "/tags/list",
            f"/referrers/{s.image.digest}",
        ]
    )


def run(s: Seeded, cls: str, strategy: st.SearchStrategy[Req]) -> None:
    @fuzz_settings(cls)
    @given(strategy)
    def check(req: Req) -> None:
        send(s, cls, req)

    check()


METHODS = [
    b"PUT", b"POST", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT", b"PROPFIND",
    b"MKCOL", b"LOCK", b"get", b"Get", b"BREW", b"M-SEARCH", b"A" * 300,
]  # fmt: skip
PUSH_METHODS = (b"PUT", b"POST", b"PATCH", b"DELETE")


def test_methods_the_facade_does_not_serve(seeded: Seeded) -> None:
    s = seeded
    methods = st.one_of(st.sampled_from(METHODS), st.from_regex(rb"\A[A-Z]{1,12}\Z"))

    @fuzz_settings("method")
    @given(methods, st.sampled_from(paths(s)))
    def check(method: bytes, path: str) -> None:
        r = send(s, "method", Req(method, enc(path)))
        if method in PUSH_METHODS:
            assert r.status == 405 and oci_code(r) == "UNSUPPORTED"
        elif method.upper() not in (b"GET", b"HEAD"):  # the server upper-cases `get`
            assert r.status in (400, 404, 405)

    check()


def test_pushes_are_refused_as_unsupported(seeded: Seeded) -> None:
    s = seeded
    uuid = st.uuids().map(str)
    body = st.binary(max_size=2048)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    digest = st.sampled_from([b.digest for b in s.image.blobs])
    ct = (b"Content-Type", OCI_MANIFEST.encode())

    def uploads(name: str, rest: str = "") -> bytes:
        return enc(f"/v2/{name}/blobs/uploads/{rest}")

    pushes = st.one_of(
        st.builds(lambda n, b: Req(b"POST", uploads(n), body=b), good_names, body),
        st.builds(
            lambda n, d: Req(b"POST", uploads(n) + f"?mount={d}&from=a/b".encode()),
            good_names,
            digest,
        ),
        st.builds(
            lambda n, d, b: Req(b"POST", uploads(n) + f"?digest={d}".encode(), body=b),
            good_names,
            digest,
            body,
        ),
        st.builds(lambda n, u, b: Req(b"PATCH", uploads(n, u), body=b), good_names, uuid, body),
        st.builds(
            lambda n, u, d: Req(b"PUT", uploads(n, u) + f"?digest={d}".encode()),
            good_names,
            uuid,
            digest,
        ),
        st.builds(lambda n, u: Req(b"GET", uploads(n, u)), good_names, uuid),
        st.builds(lambda n, u: Req(b"DELETE", uploads(n, u)), good_names, uuid),
        st.builds(
            lambda n, t: Req(b"PUT", enc(f"/v2/{n}/manifests/{t}"), (ct,), body=manifest),
            good_names,
            st.one_of(good_tags, st.just(s.image.digest)),
        ),
        st.builds(
            lambda n, t: Req(b"DELETE", enc(f"/v2/{n}/manifests/{t}")), good_names, good_tags
        ),
        st.builds(lambda n, d: Req(b"DELETE", enc(f"/v2/{n}/blobs/{d}")), good_names, digest),
    )

    @fuzz_settings("push")
    @given(pushes)
    def check(req: Req) -> None:
        r = send(s, "push", req)
        assert r.status == 405 and oci_code(r) == "UNSUPPORTED", r.raw[:300]

    check()
    # And a real client: skopeo's push stops at the first upload request.
    node_ref = f"docker://{s.node.host}/pushed/by-skopeo:latest"
    done = skopeo(
        "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
        "--src-no-creds", "--dest-no-creds", f"docker://{s.image.reference}", node_ref,
        check=False, timeout_s=120,
    )  # fmt: skip
    s.tally.record("push", "skopeo-refused" if done.returncode else "skopeo-accepted")
    assert done.returncode != 0
    assert "405" in done.stderr or "unsupported" in done.stderr.lower(), done.stderr


def test_malformed_names(seeded: Seeded) -> None:
    s = seeded
    names = st.one_of(bad_names, bad_names, good_names)
    run(
        s,
        "name",
        st.builds(lambda m, n, k: Req(m, enc(f"/v2/{n}{k}")), get_or_head(), names, kinds(s)),
    )


def test_malformed_tags(seeded: Seeded) -> None:
    s = seeded
    tags = st.one_of(bad_tags, bad_tags, good_tags)
    run(
        s,
        "tag",
        st.builds(
            lambda m, t: Req(m, enc(f"/v2/{s.image.repository}/manifests/{t}")), get_or_head(), tags
        ),
    )


def test_malformed_digests(seeded: Seeded) -> None:
    s = seeded
    real = st.sampled_from([s.image.digest, *(b.digest for b in s.image.blobs)])
    digests = st.one_of(digest_near_misses, digest_near_misses, real)
    route = st.sampled_from(["manifests", "blobs", "referrers"])

    def req(m: bytes, r: str, d: str, encoded: bool) -> Req:
        path = f"/v2/{s.image.repository}/{r}/"
        # Some near-misses are written pre-encoded (`%2f`): keep those as they are.
        return Req(m, enc(path) + (enc(d) if encoded else d.encode()))

    ascii_digests = digests.filter(lambda d: d.isascii() and not re.search(r"[\s?#]", d))
    run(
        s,
        "digest",
        st.one_of(
            st.builds(req, get_or_head(), route, digests, st.just(True)),
            st.builds(req, get_or_head(), route, ascii_digests, st.just(False)),
        ),
    )


TRAVERSALS = [
    "..", "../..", "../../..", "%2e%2e", "%2e%2e/%2e%2e", "%2E%2E%2F%2E%2E", "..%2f..", "..%5c..",
    "%252e%252e", "..\\..", "%c0%ae%c0%ae", ".%2e", "%2e.", "....//....", "..;", "..%00", "./.",
    "%2e%2e%2f%2e%2e%2f%2e%2e", "..%252f..",
]  # fmt: skip
TRAVERSAL_TARGETS = ["canary", "node/canary", "data/../canary", "etc/passwd", "proc/self/environ"]


def test_path_traversal_never_reads_outside_the_store(seeded: Seeded) -> None:
    s = seeded
    repo = s.image.repository
    shapes = [
        "/v2/{t}/{x}",
        "/v2/{t}/{t}/{x}",
        "/v2/{t}/blobs/sha256:" + "a" * 64,
        "/v2/" + repo + "/blobs/{t}/{x}",
        "/v2/" + repo + "/blobs/sha256:{t}/{x}",
        "/v2/" + repo + "/blobs/sha256:{t}%2f{x}",
        "/v2/" + repo + "/manifests/{t}%2f{x}",
        "/v2/" + repo + "/referrers/sha256:{t}",
        "/v2/" + repo + "/{t}/{t}/{t}/{x}",
        "/{t}/{t}/{x}",
        "/v2/{t}/../{x}",
        "/v2/" + repo + "/blobs/sha256:{t}",
        "/v2/" + repo + "/tags/list/{t}/{x}",
        "//{x}",
        "/v2//{x}",
    ]
    absolute = [str(p) for p in s.canary_paths]
    targets = st.one_of(st.sampled_from(TRAVERSAL_TARGETS), st.sampled_from(absolute))
    run(
        s,
        "traversal",
        st.builds(
            lambda m, shape, t, x: Req(m, shape.format(t=t, x=x).encode("ascii")),
            get_or_head(),
            st.sampled_from(shapes),
            st.sampled_from(TRAVERSALS),
            targets,
        ),
    )


@st.composite
def odd_encodings(draw: st.DrawFn, s: Seeded) -> Req:
    path = draw(st.sampled_from(paths(s)))
    how = draw(st.sampled_from(["all", "all-lower", "slashes", "some", "double", "inject", "raw"]))
    raw = path.encode()
    if how == "all":
        target = "".join(f"%{b:02X}" for b in raw).encode()
    elif how == "all-lower":
        target = "".join("/" if b == 0x2F else f"%{b:02x}" for b in raw).encode()
    elif how == "slashes":
        target = path.replace("/", "%2F").encode()
    elif how == "some":
        picks = draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
        target = b"".join(
            f"%{b:02X}".encode() if p else bytes([b]) for b, p in zip(raw, picks, strict=True)
        )
    elif how == "double":
        target = quote(path, safe="/").replace("%", "%25").encode()
    elif how == "inject":
        at = draw(st.integers(0, len(path)))
        junk = draw(
            st.sampled_from(
                ["%00", "%", "%zz", "%e2%82", "%c0%af", ";x=1", "#frag", "?", "//", "/./", "%ff",
                 "%u002e", "%0d%0aX-Injected:%20yes", "%09", "\\"]
            )
        )  # fmt: skip
        target = (path[:at] + junk + path[at:]).encode()
    else:
        # Raw bytes outside ASCII in the request target: HTTP says no.
        at = draw(st.integers(0, len(raw)))
        odd = draw(st.sampled_from(["é".encode(), b"\xff", b"\xc0\xae", "\u202e".encode()]))
        target = raw[:at] + odd + raw[at:]
    return Req(draw(get_or_head()), target)


def test_odd_encodings(seeded: Seeded) -> None:
    run(seeded, "encoding", odd_encodings(seeded))


@st.composite
def oversized(draw: st.DrawFn, s: Seeded) -> Req:
    repo = s.image.repository
    k = draw(st.sampled_from([2049, 4097, 8193, 16385, 40000, 70000]))
    what = draw(
        st.sampled_from(["path", "name", "tag", "digest", "query", "header", "headers", "range"])
    )
    m = draw(get_or_head())
    if what == "path":
        return Req(m, b"/v2/" + b"a/" * (k // 2) + b"manifests/x")
    if what == "name":
        return Req(m, f"/v2/{'a' * (k // 8)}/tags/list".encode())
    if what == "tag":
        return Req(m, f"/v2/{repo}/manifests/{'t' * (k // 8)}".encode())
    if what == "digest":
        return Req(m, f"/v2/{repo}/blobs/sha256:{'a' * (k // 8)}".encode())
    if what == "query":
        return Req(m, f"/v2/{repo}/tags/list?n={'9' * (k // 8)}&last={'x' * (k // 8)}".encode())
    target = enc(paths(s)[2])
    if what == "header":
        return Req(m, target, ((b"X-Big", b"v" * k),))
    if what == "range":
        return Req(m, target, ((b"Range", b"bytes=" + b"0-1," * (k // 4)),))
    return Req(m, target, tuple((f"X-H{i}".encode(), b"v") for i in range(k // 16)))


def test_oversized_parts(seeded: Seeded) -> None:
    run(seeded, "oversize", oversized(seeded))


QUERY_KEYS = ["ns", "n", "last", "artifactType", "digest", "mount", "from", "ns", "n", "last"]
RAW_QUERY = "&=%#/?:@!$'()*+,;[]"
NUMBERS = [
    "0",
    "1",
    "10000",
    "10001",
    "-1",
    "9" * 30,
    "1e3",
    " 1",
    "0x10",
    "²",
    "٣",
    "\uff11",
    "1.5",
    "",
]


@st.composite
def queries(draw: st.DrawFn, s: Seeded) -> Req:
    path = draw(
        st.sampled_from(
            [
                f"/v2/{s.image.repository}/tags/list",
                f"/v2/{s.image.repository}/tags/list",
                f"/v2/{s.image.repository}/referrers/{s.image.digest}",
                f"/v2/{s.image.repository}/manifests/{s.image.tag}",
                f"/v2/{s.image.repository}/blobs/{s.image.blobs[0].digest}",
                "/v2/",
            ]
        )
    )
    pairs = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(QUERY_KEYS), small_text),
                st.one_of(
                    st.sampled_from(NUMBERS),
                    st.sampled_from([s.registry.host, "docker.io", "", "a" * 300, "\x00"]),
                    small_text,
                ),
            ),
            max_size=5,
        )
    )
    if draw(st.booleans()):
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    else:
        # Delimiters left raw, with whatever that breaks: `&`, `=`, `%`, `#` in values.
        query = "&".join(f"{quote(k, safe=RAW_QUERY)}={quote(v, safe=RAW_QUERY)}" for k, v in pairs)
    target = enc(path) + b"?" + query.encode("ascii")
    return Req(draw(get_or_head()), target)


def test_query_parameters(seeded: Seeded) -> None:
    s = seeded

    run(s, "query", queries(s))


RANGE_ODDITIES = [
    "bytes=", "bytes=-", "bytes=--1", "bytes=1-2-3", "bytes=a-b", "bytes = 1-2", "BYTES=0-1",
    "bytes=0-1,2-3", "bytes=1-0", "items=0-1", "bytes 0-1", "=0-1", "bytes=٣-٤", "bytes=²-",
    "bytes=0x10-", "bytes=+1-2", "bytes=1_000-", "bytes=0-" + "9" * 1000, "bytes=0-1," * 300,
    "bytes=-0", "bytes=0-0", "bytes=\t1-2", "bytes=1 -2",
]  # fmt: skip


def test_range_values(seeded: Seeded) -> None:
    s = seeded
    blob = st.sampled_from(sorted(s.blobs))

    @st.composite
    def ranges(draw: st.DrawFn) -> tuple[str, str]:
        digest = draw(blob)
        size = len(s.blobs[digest])
        n = st.one_of(st.integers(0, size + 2), st.integers(0, 10**30))
        value = draw(
            st.one_of(
                st.builds(lambda a, b: f"bytes={a}-{b}", n, n),
                st.builds(lambda a: f"bytes={a}-", n),
                st.builds(lambda a: f"bytes=-{a}", n),
                st.sampled_from(RANGE_ODDITIES),
                st.text(st.characters(max_codepoint=255, exclude_categories=["Cc"]), max_size=40),
                st.text(max_size=20).map(lambda t: "bytes=" + t),
            )
        )
        return digest, value

    @fuzz_settings("range")
    @given(ranges(), get_or_head())
    def check(spec: tuple[str, str], method: bytes) -> None:
        digest, value = spec
        target = enc(f"/v2/{s.image.repository}/blobs/{digest}")
        header = value.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"")
        r = send(s, "range", Req(method, target, ((b"Range", header),)))
        blob_bytes = s.blobs[digest]
        if method != b"GET" or r.status not in (200, 206):
            return
        if r.status == 206:
            m = re.fullmatch(rb"bytes (\d+)-(\d+)/(\d+)", r.header("Content-Range") or b"")
            assert m is not None, r.headers
            start, end, size = (int(g) for g in m.groups())
            assert size == len(blob_bytes) and r.body == blob_bytes[start : end + 1]
        else:
            assert r.body == blob_bytes
        s.tally.bytes_verified += len(r.body)

    check()


def test_accept_headers(seeded: Seeded) -> None:
    s = seeded
    types = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, "*/*", "application/json"]
    one = st.one_of(
        st.sampled_from(types),
        st.sampled_from(types).map(lambda t: t + ";q=0.5"),
        st.sampled_from(types).map(lambda t: t + ';q=abc;x="y"'),
        st.text(max_size=40),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        st.integers(100, 12000).map(lambda k: "a/" + "b" * k),
    )
    values = st.lists(one, min_size=1, max_size=4).map(", ".join)
    path = st.sampled_from(
        [
            f"/v2/{s.image.repository}/manifests/{s.image.tag}",
            f"/v2/{s.image.repository}/manifests/{s.image.digest}",
            f"/v2/{s.image.repository}/referrers/{s.image.digest}",
        ]
    )

    def req(m: bytes, p: str, vs: list[str]) -> Req:
        headers = tuple((b"Accept", _header_bytes(v)) for v in vs)
        return Req(m, enc(p), headers)

    run(s, "accept", st.builds(req, get_or_head(), path, st.lists(values, min_size=1, max_size=3)))


def _header_bytes(value: str) -> bytes:
    """A header value as bytes on the wire: UTF-8, with the line breaks taken out."""
    return value.encode("utf-8", "surrogateescape").replace(b"\r", b"").replace(b"\n", b"")


# Headers that change HTTP framing or the connection are the protocol class's job.
FRAMING = {
    b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect", b"host",
    b"http2-settings", b"te", b"trailer", b"keep-alive",
}  # fmt: skip
HEADER_NAMES = [
    b"Authorization", b"X-Forwarded-For", b"X-Real-IP", b"Forwarded", b"Cookie", b"If-None-Match",
    b"If-Range", b"If-Modified-Since", b"Content-Type", b"Origin", b"Accept-Encoding", b"Range",
    b"Docker-Distribution-API-Version", b"User-Agent", b"Referer", b"X-Original-URL",
]  # fmt: skip


def test_other_headers(seeded: Seeded) -> None:
    s = seeded
    names = st.one_of(
        st.sampled_from(HEADER_NAMES), st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}\Z")
    ).filter(lambda n: n.lower() not in FRAMING)
    values = st.one_of(
        st.text(st.characters(max_codepoint=255, exclude_categories=["Cc"]), max_size=60).map(
            lambda t: t.encode("latin-1")
        ),
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b"Bearer " + b"x" * 5000, b"Basic !!!", b"Bearer", b"\xff\xfe", b""]),
    )
    headers = st.lists(st.tuples(names, values), min_size=1, max_size=6).map(tuple)
    run(
        s,
        "header",
        st.builds(
            lambda m, p, h: Req(m, enc(p), h), get_or_head(), st.sampled_from(paths(s)), headers
        ),
    )


PROTOCOL = [
    b"GET /v2/\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\n\r\n",
    b"GET /v2/ HTTP/1.0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /v2/ HTTP/1.1\nHost: x\n\n",
    b"GET  /v2/  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: a\r\n  continued\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nab",
    b"PUT /v2/a/manifests/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    b"GET http://evil.example/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/../../canary HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET ../../canary HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00",
    b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/../../canary HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 5000 + b"\r\n",
    b"G" * 20000 + b" / HTTP/1.1\r\n\r\n",
]


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for at, delete, insert in edits:
        at %= len(out) + 1
        out[at : at + delete] = insert
    return bytes(out)


def test_malformed_http(seeded: Seeded) -> None:
    s = seeded
    base = build_request(b"GET", enc(paths(s)[1]), ((b"Accept", ACCEPT_ALL.encode()),))
    edits = st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 8), st.binary(max_size=8)),
        min_size=1,
        max_size=6,
    )
    raws = st.one_of(
        st.sampled_from(PROTOCOL),
        edits.map(lambda e: _mutate(base, e)),
        st.binary(max_size=400),
    )
    run(s, "protocol", raws.map(lambda raw: Req(b"", b"", raw=raw)))


def test_the_node_s_own_endpoints(seeded: Seeded) -> None:
    """`/_p2preg/status`, `/_p2preg/preheat/<name>/blobs/<digest>`, `/metrics`, `/healthz`."""
    s = seeded
    real = st.sampled_from([b.digest for b in s.image.blobs])
    names = st.one_of(st.just(s.image.repository), bad_names, st.sampled_from(TRAVERSALS))
    digests = st.one_of(real, digest_near_misses, st.sampled_from(TRAVERSALS))
    ns = st.one_of(st.none(), st.just(s.registry.host), small_text)

    def preheat(name: str, digest: str, registry: str | None) -> Req:
        query = b"" if registry is None else b"?ns=" + quote(registry, safe="").encode()
        return Req(b"POST", enc(f"/_p2preg/preheat/{name}/blobs/{digest}") + query)

    others = st.builds(
        lambda m, p: Req(m, p),
        st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
        st.sampled_from(
            [b"/_p2preg/status", b"/_p2preg/status?x=%ff", b"/_p2preg/preheat/", b"/_p2preg/",
             b"/_p2preg/preheat/%2e%2e/%2e%2e/canary", b"/metrics", b"/healthz", b"/metrics/..",
             b"/_p2preg/preheat/" + enc(s.image.repository) + b"/manifests/latest"]
        ),
    )  # fmt: skip
    run(s, "admin", st.one_of(st.builds(preheat, names, digests, ns), others))


def test_bugs_found_by_fuzzing_stay_fixed(seeded: Seeded) -> None:
    """Each of these was a 500 or a dead node before the fix named in docs/RELIABILITY.md."""
    s = seeded
    repo = s.image.repository
    tags = enc(f"/v2/{repo}/tags/list")
    # `n=²`: str.isdigit() said yes, int() said no.
    r = send(s, "query", Req(b"GET", tags + b"?n=%C2%B2"))
    assert r.status == 400 and oci_code(r) == "PAGINATION_NUMBER_INVALID"
    # Non-ASCII (and otherwise unforwardable) Accept values: httpx refused to send them.
    manifest = enc(f"/v2/{repo}/manifests/{s.image.tag}")
    for junk in (b"\xe9\xff", ACCEPT_ALL.encode() + b", \xff/x", b"a/b, ", b"a/" + b"b" * 9000):
        r = send(
            s,
            "accept",
            Req(b"GET", manifest, ((b"Accept", ACCEPT_ALL.encode()), (b"Accept", junk))),
        )
        assert r.status == 200 and r.header("Docker-Content-Digest") == s.image.digest.encode()
    # A stored layer or config asked for as a manifest: the seed answers that with a 500.
    for blob in s.image.blobs:
        r = send(s, "digest", Req(b"GET", enc(f"/v2/{repo}/manifests/{blob.digest}")))
        assert r.status == 404 and oci_code(r) == "MANIFEST_UNKNOWN"
    # A malformed chunked body while the app answers: hypercorn let BusyResourceError
    # out of the connection, which stopped the whole server within a few requests.
    bad_chunk = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
    for _ in range(20):
        send(s, "protocol", Req(b"", b"", raw=bad_chunk))
    s.node.process.check_running()
    with httpx.Client(trust_env=False, timeout=30) as http:
        assert http.get(f"{s.node.url}/healthz").status_code == 200


def test_node_stays_healthy_and_reads_only_its_store(seeded: Seeded) -> None:
    """Runs last: after everything above, the node is fine and opened nothing it should not."""
    s = seeded
    s.node.process.check_running()
    with httpx.Client(trust_env=False, timeout=30) as http:
        assert http.get(f"{s.node.url}/healthz").status_code == 200
    pull_and_verify(s)
    s.node.process.check_running()
    log = s.node.process.log_path.read_text("utf-8", "replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    s.registry.settle()
    seed_errors = [r for r in s.registry.served_requests() if r.status >= 500]
    assert not seed_errors, seed_errors[:5]
    opened = _opened(s.open_log)
    assert opened, "the audit hook did not load into the node"
    for path in s.canary_paths:
        assert str(path) not in opened, f"the node opened the canary {path}"
    allowed = _allowed_roots(s.node.data_dir)
    # Directories on sys.path, which the import system lists (never reads beneath).
    listed = {str(Path(__file__).resolve().parents[1]), str(s.open_log.parent / "hook")}
    outside = sorted(
        p for p in opened if p not in listed and not any(_under(p, root) for root in allowed)
    )
    assert not outside, f"the node opened files outside its store and code: {outside[:20]}"
    s.tally.extra["files_opened_by_node"] = len(opened)
    s.tally.extra["files_opened_outside_store_and_code"] = len(outside)


def _opened(log: Path) -> set[str]:
    paths: set[str] = set()
    for line in log.read_text().splitlines():
        _, _, literal = line.partition(" ")
        value = ast.literal_eval(literal)
        paths.add(value if isinstance(value, str) else str(value))
    return paths


def _allowed_roots(data_dir: Path) -> list[str]:
    """The store, and what a Python process legitimately reads: its code and libraries."""
    repo = Path(__file__).resolve().parents[1]
    roots = {str(data_dir), str(data_dir.resolve()), sys.prefix, sys.base_prefix}
    roots |= {str(repo / "p2preg"), str(repo / "tracker")}
    roots |= {os.path.realpath(r) for r in list(roots)}
    # Read by the standard library and prometheus-client's process collector
    # (/proc/self, /proc/stat), never named by a request.
    roots |= {"/dev/null", "/dev/urandom", "/proc/self", "/proc/stat", "/etc/localtime"}
    return sorted(roots)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
