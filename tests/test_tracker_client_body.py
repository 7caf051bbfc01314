"""The tracker client's request body (tracker/client_failures.py `OneChunk`).

httpx's stream for a bytes body is an async generator; a request cancelled while
its body was being written (a node shutting down, a test's teardown) left one
suspended, which trio finalizes when it is collected, with a ResourceWarning
(an error under this suite's filterwarnings). `OneChunk` is a plain iterator:
abandoned mid-way, there is nothing to finalize. Whole, it gives the body once
per iteration, so a request sent again to the next tracker sends it again.
"""

from __future__ import annotations

import gc

import httpx

from tracker.client_failures import OneChunk


async def test_the_body_comes_whole_once_per_send() -> None:
    body = OneChunk(b"msgpack body")
    for _ in range(2):  # sent again to the next tracker
        assert [chunk async for chunk in body] == [b"msgpack body"]


async def test_a_body_abandoned_while_being_written_leaves_nothing_to_finalize() -> None:
    sending = aiter(OneChunk(b"x"))
    assert await anext(sending) == b"x"
    del sending  # the request was cancelled here: httpx's own stream would warn
    gc.collect()


async def test_httpx_sends_it_with_its_length() -> None:
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen["length"] = request.headers["Content-Length"]
        seen["body"] = request.read()
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        request = http.build_request("POST", "http://tracker/v1/x", content=b"abc")
        request.stream = OneChunk(b"abc")
        assert (await http.send(request)).status_code == 204
    assert seen == {"length": "3", "body": b"abc"}
