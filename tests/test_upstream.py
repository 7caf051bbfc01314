"""The upstream client's retry, auth, redirect and resume rules.

The seed registry is replaced by an httpx transport that scripts its answers,
so each rule is exercised exactly (the real registry is used in
test_node_facade.py). Backoff sleeps run on trio's MockClock: nothing here
waits on a thread or a socket.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio
import trio.testing

from p2preg.core.digest import Digest
from p2preg.node.config import Credential, Upstream
from p2preg.node.errors import (
    RegistryError,
    UpstreamError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from p2preg.node.tagmap import stale_allowed
from p2preg.node.upstream import UpstreamClient

BLOB = bytes(range(256)) * 64
DIGEST = Digest("sha256", hashlib.sha256(BLOB).hexdigest())
REG = "https://seed.test"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler, *, credential: Credential | None = None) -> UpstreamClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return UpstreamClient(Upstream("seed.test", REG), http, credential=credential, retries=3)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.resets = 0

    @property
    def offset(self) -> int:
        return len(self.data)

    async def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def reset(self) -> None:
        self.resets += 1
        self.data.clear()


async def test_retries_5xx_and_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    answers = [
        httpx.Response(503),
        httpx.Response(429, headers={"Retry-After": "7"}),
        httpx.Response(200, content=b"{}"),
    ]
    seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(trio.current_time())
        return answers.pop(0)

    fetched = await _client(handler).fetch("GET", "a", "tags/list", max_bytes=100)
    assert fetched is not None and fetched.body == b"{}"
    assert len(seen) == 3
    assert seen[2] - seen[1] == pytest.approx(7, abs=0.01)  # Retry-After, not the backoff


async def test_gives_up_after_the_retries(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UpstreamUnavailable):
        await _client(handler).fetch("GET", "a", "tags/list", max_bytes=100)
    assert calls == 4


async def test_a_long_retry_after_is_passed_to_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3600"})

    with pytest.raises(UpstreamUnavailable) as exc:
        await _client(handler).fetch("GET", "a", "tags/list", max_bytes=100)
    assert exc.value.headers == {"Retry-After": "3600"}


async def test_bearer_token_flow_and_cache() -> None:
    token_calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            token_calls.append(request)
            return httpx.Response(200, json={"token": "T", "expires_in": 300})
        if request.headers.get("Authorization") != "Bearer T":
            return httpx.Response(
                401, headers={"WWW-Authenticate": f'Bearer realm="{REG}/token",service="seed"'}
            )
        return httpx.Response(200, content=b"ok")

    client = _client(handler, credential=Credential("seed.test", "alice", "pw"))
    for _ in range(3):
        assert (await client.fetch("GET", "a/b", "tags/list", max_bytes=10)) is not None
    assert len(token_calls) == 1
    params = token_calls[0].url.params
    assert (params["scope"], params["service"]) == ("repository:a/b:pull", "seed")
    assert token_calls[0].headers["Authorization"].startswith("Basic ")
    await client.fetch("GET", "c", "tags/list", max_bytes=10)  # another repository's scope
    assert len(token_calls) == 2


async def test_refused_credentials_are_a_clean_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(401)
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REG}/token"'})

    with pytest.raises(UpstreamUnauthorized):
        await _client(handler).fetch("GET", "a", "tags/list", max_bytes=10)


async def test_redirect_to_storage_drops_authorization() -> None:
    seen: dict[str, httpx.Headers] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers
        if request.url.host == "seed.test":
            if "Authorization" not in request.headers:
                return httpx.Response(
                    401, headers={"WWW-Authenticate": f'Bearer realm="{REG}/token"'}
                )
            if request.url.path == "/token":
                return httpx.Response(200, json={"token": "T"})
            return httpx.Response(307, headers={"Location": "https://s3.test/blob?sig=x"})
        return httpx.Response(200, content=BLOB)

    def token_first(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "T"})
        return handler(request)

    sink = Sink()
    await _client(token_first).fetch_blob("a", DIGEST, sink)
    assert bytes(sink.data) == BLOB
    assert seen["seed.test"]["Authorization"] == "Bearer T"
    assert "Authorization" not in seen["s3.test"]


async def test_blob_cut_short_is_resumed_with_range(autojump_clock: trio.testing.MockClock) -> None:
    ranges: list[str | None] = []

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BLOB[:5000]
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            return httpx.Response(200, stream=Cut())
        start = int(request.headers["Range"].split("=")[1].rstrip("-"))
        return httpx.Response(
            206,
            content=BLOB[start:],
            headers={"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"},
        )

    sink = Sink()
    await _client(handler).fetch_blob("a", DIGEST, sink)
    assert bytes(sink.data) == BLOB
    assert ranges == [None, "bytes=5000-"]
    assert sink.resets == 0


async def test_upstream_that_cannot_resume_starts_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BLOB[:100]
            raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, stream=Cut())
        return httpx.Response(200, content=BLOB)  # ignores Range

    sink = Sink()
    await _client(handler).fetch_blob("a", DIGEST, sink)
    assert bytes(sink.data) == BLOB and sink.resets == 1


async def test_wrong_resume_offset_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BLOB[:100]
            raise httpx.ReadError("reset")

    def handler(request: httpx.Request) -> httpx.Response:
        if "Range" not in request.headers:
            return httpx.Response(200, stream=Cut())
        return httpx.Response(206, content=BLOB[50:], headers={"Content-Range": "bytes 50-*/*"})

    with pytest.raises(UpstreamError, match="wrong offset"):
        await _client(handler).fetch_blob("a", DIGEST, Sink())


async def test_oversized_answer_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 1000)

    with pytest.raises(UpstreamError, match="larger than"):
        await _client(handler).fetch("GET", "a", "manifests/x", max_bytes=999)


async def test_each_final_answer_says_whether_upstream_is_down_or_has_spoken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The resolver answers a stale tag only on the first kind (tagmap.stale_allowed)."""

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"schemaVersion"'
            raise httpx.ReadError("connection reset")

    down: dict[str, Callable[[], httpx.Response]] = {
        "500": lambda: httpx.Response(500),
        "503": lambda: httpx.Response(503),
        "429": lambda: httpx.Response(429, headers={"Retry-After": "1"}),
        "body cut": lambda: httpx.Response(200, stream=Cut()),
    }
    for name, answer in down.items():
        with pytest.raises(RegistryError) as exc:
            await _client(lambda request, a=answer: a()).fetch(  # type: ignore[misc]
                "GET", "a", "manifests/latest", max_bytes=1000
            )
        assert stale_allowed(exc.value), name
    spoken = {400: UpstreamError, 401: UpstreamUnauthorized, 403: UpstreamUnauthorized}
    for status, kind in spoken.items():
        with pytest.raises(kind) as exc:
            await _client(lambda request, s=status: httpx.Response(s)).fetch(  # type: ignore[misc]
                "GET", "a", "manifests/latest", max_bytes=1000
            )
        assert not stale_allowed(exc.value), status
    missing = await _client(lambda request: httpx.Response(404)).fetch(
        "GET", "a", "manifests/latest", max_bytes=1000
    )
    assert missing is None
