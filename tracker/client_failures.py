"""How a call of the tracker client fails cleanly: which tracker, why, and no leftovers.

Owns the text of a tracker failure (naming its tracker once, the TLS reason
under httpx's exceptions), the exception a non-2xx reply stands for (the class
the tracker raised, by its error code), and `OneChunk`, the request body the
client sends: httpx's own for bytes is an async generator, which a request
cancelled while its body was being written (a node shutting down) leaves
suspended, for trio to finalize and warn about whenever it is collected; and a
reply body that does not decode is the tracker failing on its side. Pure
functions and a plain iterator; it must not send anything.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import httpx

from p2preg.core import errors, wire


def decoded(cls: type[wire.M], content: bytes) -> wire.M:
    """A reply's body as `cls`; one that is not is the tracker failing on its side."""
    try:
        return wire.decode(cls, content)
    except wire.WireError as e:
        raise errors.TrackerUnavailable(f"tracker sent a bad reply: {e}") from None


def named(base: str, failure: errors.TrackerError) -> str:
    """The failure, naming its tracker once."""
    text = str(failure)
    return text if text.startswith(f"tracker {base}") else f"tracker {base}: {text}"


# A TLS 1.3 server checks the client's certificate after the client thinks the
# handshake is done; the tracker then closes without a word (trio drops the alert).
_REFUSED_AFTER_HANDSHAKE = (
    "the tracker closed the TLS connection without an answer: if this repeats, it "
    "refuses this node's certificate (another CA, expired, or not a node of its "
    "cluster); its p2preg_tracker_tls_refusals_total says which"
)


def why(e: httpx.HTTPError, *, tls: bool = False) -> str:
    """The exception, or the TLS failure under it: httpx's ConnectError says nothing itself."""
    if tls and isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
        return _REFUSED_AFTER_HANDSHAKE
    cause: BaseException | None = e
    for _ in range(5):  # a chain of a few wrappers at most
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: {cause.verify_message} (the tracker's certificate)"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return repr(e)


def reply_error(response: httpx.Response) -> errors.TrackerError:
    try:
        body = wire.decode(wire.ErrorReply, response.content)
    except wire.WireError:
        return errors.TrackerUnavailable(f"tracker answered {response.status_code}")
    if response.status_code >= 500 and body.error not in errors.BY_CODE:
        return errors.TrackerUnavailable(body.message)
    return errors.BY_CODE.get(body.error, errors.TrackerError)(body.message)


class OneChunk(httpx.AsyncByteStream):
    """A request body given whole, iterated without an async generator."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data
