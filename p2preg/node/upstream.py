"""OCI pull client for one seed registry.

Owns everything about talking to an upstream registry: bearer-token auth
(anonymous or with basic credentials, per-repository scope, tokens cached until
expiry), retries with backoff on 429/5xx/connection errors (honouring
`Retry-After`), timeouts, and blob redirects (an S3-style 307 is followed
without sending our `Authorization` to another origin). Before it sends
credentials anywhere or follows a redirect or a token realm it asks the rules
in egress.py (https only, the registry's own host or a trusted realm, no
loopback or link-local target unless the registry is there). Blob bodies are
resumed with `Range` when a connection drops mid-way. It never logs
credentials or tokens, and it never decides what to cache: callers do.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol, cast
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from p2preg.core.digest import Digest
from p2preg.node.auth import (
    ChallengeError,
    TokenCache,
    parse_challenge,
    parse_token_response,
    repository_scope,
)
from p2preg.node.config import Credential, Upstream
from p2preg.node.egress import Egress
from p2preg.node.errors import (
    RegistryError,
    UpstreamError,
    UpstreamServerError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from p2preg.node.seams import UpstreamSeam

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 10.0
# A Retry-After longer than this is not worth holding a client request for.
RETRY_AFTER_MAX_S = 30.0
MAX_TAGS_PAGES = 1000


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: httpx.Headers
    body: bytes


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


class BlobSink(Protocol):
    """Where blob bytes go; `reset` starts over when the upstream cannot resume."""

    @property
    def offset(self) -> int: ...

    async def write(self, chunk: bytes) -> None: ...

    async def reset(self) -> None: ...



def _body_chunks(r: httpx.Response) -> AbstractAsyncContextManager[AsyncGenerator[bytes, None]]:
    """The body's chunks, closed as soon as the reader stops, even early.

    httpx's iterator is an async generator; left to the garbage collector it is
    closed at some later point, outside any task (a ResourceWarning).
    """
    return aclosing(cast("AsyncGenerator[bytes, None]", r.aiter_bytes()))

async def _small_body(
    r: httpx.Response,
    what: str,
    max_bytes: int,
    throttle: Callable[[int], Awaitable[None]] | None = None,
) -> bytes:
    """The whole body, at most `max_bytes`, at the upstream cap (`throttle`); a
    connection cut or stalled mid-body is the seed registry being unreachable,
    like a refused one."""
    chunks = []
    total = 0
    try:
        # Closed at once when we stop early, not whenever it is collected.
        async with _body_chunks(r) as body_chunks:
            async for chunk in body_chunks:
                total += len(chunk)
                if throttle is not None:
                    await throttle(len(chunk))
                if total > max_bytes:
                    raise UpstreamError(f"{what} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except (httpx.TransportError, httpx.StreamError) as e:
        raise UpstreamUnavailable(f"{what} was cut short: {type(e).__name__}") from None
    return b"".join(chunks)


class UpstreamClient:
    def __init__(
        self,
        upstream: Upstream,
        http: httpx.AsyncClient,
        *,
        credential: Credential | None = None,
        retries: int = 4,
        on_bytes: Callable[[int], None] = lambda n: None,
        trusted_realms: Sequence[str] = (),
        throttle: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.upstream = upstream
        # The node's upstream cap (limits.py), shared by its clients: every body
        # chunk waits there before it is used, so a capped node reads slower
        # and TCP slows the registry's sending down with it.
        self._throttle = throttle
        self._http = http
        self._credential = credential
        self._egress = Egress.of(upstream.url, trusted_realms)
        self._retries = retries
        self._tokens = TokenCache(trio.current_time)
        self._basic = False  # the registry asked for Basic auth
        self._on_bytes = on_bytes
        self.token_fetches = 0

    # -- request plumbing -------------------------------------------------

    def _auth_header(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self._credential is not None:
            auth = httpx.BasicAuth(self._credential.username, self._credential.password)
            request = auth.auth_flow(httpx.Request("GET", self.upstream.url))
            return {"Authorization": next(request).headers["Authorization"]}
        return {}

    async def _authenticate(self, response: httpx.Response, scope: str) -> None:
        header = response.headers.get("WWW-Authenticate")
        if header is None:
            raise UpstreamUnauthorized("the seed registry refused access without a challenge")
        try:
            challenge = parse_challenge(header)
        except ChallengeError as e:
            raise UpstreamError(f"seed registry sent a bad auth challenge: {e}") from None
        if challenge.scheme == "basic":
            if self._credential is None or self._basic:
                raise UpstreamUnauthorized("the seed registry wants credentials we do not have")
            self._refuse_credentials(self.upstream.url)
            self._basic = True
            return
        if challenge.scheme != "bearer" or not challenge.realm.startswith(("http://", "https://")):
            raise UpstreamError(f"unsupported auth challenge scheme {challenge.scheme!r}")
        refusal = self._egress.target_refusal(challenge.realm)
        if refusal is not None:
            raise UpstreamError(f"seed registry {self.upstream.ns} named a token realm refused: "
                                f"{refusal}")
        params = {"scope": scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        auth = None
        if self._credential is not None:
            self._refuse_credentials(challenge.realm)
            auth = httpx.BasicAuth(self._credential.username, self._credential.password)
        self.token_fetches += 1
        try:
            r = await self._http.get(challenge.realm, params=params, auth=auth)
        except httpx.HTTPError as e:
            raise UpstreamUnavailable(f"token service unreachable: {type(e).__name__}") from None
        if r.status_code in (401, 403):
            raise UpstreamUnauthorized("the token service refused our credentials")
        if r.status_code >= 500:
            raise UpstreamServerError(f"token service answered {r.status_code}")
        if r.status_code != 200:
            raise UpstreamError(f"token service answered {r.status_code}")
        try:
            token = parse_token_response(r.json(), trio.current_time())
        except (ValueError, ChallengeError) as e:
            raise UpstreamError(f"token service sent a bad answer: {e}") from None
        self._tokens.put(scope, token)

    def _refuse_credentials(self, url: str) -> None:
        """Raise unless our basic credentials may go to `url` (egress.py's rules)."""
        refusal = self._egress.credentials_refusal(url)
        if refusal is not None:
            log.warning(
                "upstream %s: not sending credentials: %s", self.upstream.ns, refusal
            )
            raise UpstreamUnauthorized(
                f"credentials for {self.upstream.ns} are not sent there: {refusal} "
                "(trusted_realms lists the token hosts that may have them)"
            )

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        repository: str,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """One logical request: auth, retries and redirects; yields a streaming response.

        Yields only final responses (2xx, 404, or a 4xx the caller maps);
        retryable failures that outlast the retries raise UpstreamUnavailable.
        """
        scope = repository_scope(repository)
        url = self.upstream.url + path
        attempt = 0
        authed_once = False
        while True:
            send_headers = {**(headers or {}), **self._auth_header(scope)}
            delay: float | None = None
            try:
                response = await self._send(method, url, send_headers)
            except httpx.TransportError as e:
                if attempt >= self._retries:
                    raise UpstreamUnavailable(
                        f"seed registry {self.upstream.ns} unreachable: {type(e).__name__}"
                    ) from None
                log.info("upstream %s %s: %s, retrying", method, path, type(e).__name__)
            else:
                if response.status_code == 401 and not authed_once:
                    await response.aclose()
                    authed_once = True
                    self._tokens.drop(scope)
                    await self._authenticate(response, scope)
                    continue
                if response.status_code in RETRY_STATUSES and attempt < self._retries:
                    delay = _retry_after(response)
                    await response.aclose()
                    if delay is not None and delay > RETRY_AFTER_MAX_S:
                        raise UpstreamUnavailable(
                            f"seed registry asks to retry after {delay:.0f} s",
                            headers={"Retry-After": str(math.ceil(delay))},
                        )
                    log.info("upstream %s %s: %d, retrying", method, path, response.status_code)
                else:
                    try:
                        yield response
                    finally:
                        await response.aclose()
                    return
            attempt += 1
            if delay is None:
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
            await trio.sleep(delay)

    async def _send(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        origin = _origin(url)
        redirected = False
        for _ in range(MAX_REDIRECTS + 1):
            request = self._http.build_request(method, url, headers=headers)
            response = await self._http.send(request, stream=True)
            if redirected:
                await self._check_peer(response)
            if response.status_code not in REDIRECTS or "Location" not in response.headers:
                return response
            await response.aclose()
            url = urljoin(url, response.headers["Location"])
            refusal = self._egress.target_refusal(url)
            if refusal is not None:
                raise UpstreamError(
                    f"seed registry {self.upstream.ns} redirected to a refused target: {refusal}"
                )
            redirected = True
            if _origin(url) != origin:
                # Our token is for the registry, never for its storage backend,
                # and never for plain http.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise UpstreamError("seed registry redirected too many times")

    async def _check_peer(self, response: httpx.Response) -> None:
        """A redirect to a name that resolved to loopback or link-local: drop it unread."""
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        refusal = self._egress.peer_refusal(str(peer[0])) if peer else None
        if refusal is not None:
            await response.aclose()
            raise UpstreamError(f"seed registry {self.upstream.ns} redirect refused: {refusal}")

    def _fail(self, response: httpx.Response, what: str) -> RegistryError:
        if response.status_code in (401, 403):
            return UpstreamUnauthorized(f"seed registry denied access to {what}")
        if response.status_code == 429:
            return UpstreamUnavailable(f"seed registry rate-limited {what}")
        if response.status_code >= 500:
            return UpstreamServerError(f"seed registry answered {response.status_code} for {what}")
        return UpstreamError(f"seed registry answered {response.status_code} for {what}")

    # -- the operations the node needs ------------------------------------

    async def fetch(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_bytes: int,
    ) -> Fetched | None:
        """A small GET/HEAD under `/v2/<repository>/`; None when upstream says 404."""
        async with self._open(method, f"/v2/{repository}/{path}", repository, headers) as r:
            if r.status_code == 404:
                return None
            if r.status_code >= 300:
                raise self._fail(r, f"{repository}/{path}")
            body = b"" if method == "HEAD" else await _small_body(
                r, f"{repository}/{path}", max_bytes, self._throttle
            )
            return Fetched(r.status_code, r.headers, body)

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """Size of the blob if `repository` holds it upstream, else None."""
        fetched = await self.fetch("HEAD", repository, f"blobs/{digest}", max_bytes=0)
        if fetched is None:
            return None
        length = fetched.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else -1

    async def tags(self, repository: str) -> list[str] | None:
        """Every tag of `repository`, following the registry's own pagination."""
        tags: list[str] = []
        path = "tags/list"
        for _ in range(MAX_TAGS_PAGES):
            fetched = await self.fetch("GET", repository, path, max_bytes=16 * 1024 * 1024)
            if fetched is None:
                return None
            try:
                page = json.loads(fetched.body).get("tags") or []
            except (ValueError, AttributeError):
                raise UpstreamError("seed registry sent a malformed tag list") from None
            tags.extend(t for t in page if isinstance(t, str))
            link = fetched.headers.get("Link", "")
            if 'rel="next"' not in link:
                return tags
            target = link.split(";")[0].strip().strip("<>")
            prefix = f"/v2/{repository}/"
            target = urlsplit(target)._replace(scheme="", netloc="").geturl()
            if not target.startswith(prefix):
                raise UpstreamError("seed registry sent a foreign pagination link")
            path = target[len(prefix) :]
        raise UpstreamError("seed registry tag list did not end")

    async def fetch_blob(self, repository: str, digest: Digest, sink: BlobSink) -> None:
        """Stream the blob into `sink`, resuming with Range after a cut connection.

        Verification is the sink's job; this only guarantees the bytes arrive in
        order from offset 0.
        """
        cuts = 0
        while True:
            headers = {"Range": f"bytes={sink.offset}-"} if sink.offset else {}
            try:
                async with self._open(
                    "GET", f"/v2/{repository}/blobs/{digest}", repository, headers
                ) as r:
                    if r.status_code == 404:
                        raise UpstreamError(f"seed registry lost blob {digest} of {repository}")
                    if r.status_code == 206:
                        if not r.headers.get("Content-Range", "").startswith(
                            f"bytes {sink.offset}-"
                        ):
                            raise UpstreamError("seed registry resumed at the wrong offset")
                    elif r.status_code == 200:
                        if sink.offset:
                            await sink.reset()
                    else:
                        raise self._fail(r, f"blob {digest}")
                    async with _body_chunks(r) as body_chunks:
                        async for chunk in body_chunks:
                            if self._throttle is not None:
                                await self._throttle(len(chunk))
                            self._on_bytes(len(chunk))
                            await sink.write(chunk)
                    return
            except (httpx.TransportError, httpx.StreamError) as e:
                cuts += 1
                if cuts > self._retries:
                    raise UpstreamUnavailable(
                        f"blob {digest} download kept failing: {type(e).__name__}"
                    ) from None
                log.info("upstream blob %s cut at %d bytes, resuming", digest, sink.offset)
                await trio.sleep(BACKOFF_BASE_S * cuts)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


class Upstreams:
    """The seed registries this node mirrors, by the name containerd sends as `?ns=`
    (or a client puts first in the path, routes.py).

    The first one also serves requests that name none.
    """

    def __init__(self, clients: Sequence[UpstreamSeam]) -> None:
        if not clients:
            raise ValueError("a node mirrors at least one seed registry")
        self._default = clients[0]
        self._by_ns = {c.upstream.ns: c for c in clients}

    def client_for(self, ns: str | None) -> UpstreamSeam | None:
        return self._by_ns.get(ns) if ns else self._default

    @property
    def upstreams(self) -> list[Upstream]:
        return [c.upstream for c in self._by_ns.values()]

    @property
    def names(self) -> frozenset[str]:
        """The names a request's path may start with to pick an upstream (routes.py)."""
        return frozenset(self._by_ns)
