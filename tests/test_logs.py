"""Logs: readable lines by default, one JSON object per line on request, for node and tracker.

The formatter is checked directly (fields passed with `extra=` become JSON
keys); real node and tracker processes started with `--log-json` write only
JSON lines, and the node's per-blob line carries its digest and source as
fields.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from harness.registry import Registry
from harness.tracker import open_tracker
from p2preg.core.logs import setup_logging
from tests.conftest import MakeNode, PushImage


def _records(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_lines_carry_extra_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(json_lines=True)
        log = logging.getLogger("p2preg.test")
        log.info("blob %s done", "sha256:x", extra={"digest": "sha256:x", "where": Path("/a")})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "blob sha256:x done" and first["level"] == "info"
    assert first["logger"] == "p2preg.test" and first["digest"] == "sha256:x"
    assert first["where"] == "/a" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


@pytest.mark.integration
def test_a_node_and_a_tracker_log_json_when_asked(
    registry: Registry, push_image: PushImage, make_node: MakeNode, tmp_path: Path
) -> None:
    image = push_image(registry, "single")
    node = make_node(f"seed.test={registry.url}", args=("--log-json",))
    blob = image.blobs[0]
    assert httpx.get(f"{node.url}/v2/{image.repository}/blobs/{blob.digest}").status_code == 200
    records = _records(node.process.log_path)
    (line,) = [r for r in records if str(r["msg"]).startswith("blob ")]
    assert line["digest"] == blob.digest and line["source"] == "upstream"
    assert line["size"] == blob.size and line["repository"] == image.repository
    with open_tracker(tmp_path / "tracker", args=("--log-json",)) as tracker:
        assert httpx.get(f"{tracker.url}/healthz").status_code == 200
        log_path = tracker.process.log_path
    assert any("tracker serving on" in str(r["msg"]) for r in _records(log_path))


@pytest.mark.integration
def test_logs_are_readable_lines_by_default(
    registry: Registry, make_node: MakeNode
) -> None:
    node = make_node(f"seed.test={registry.url}")
    text = node.process.log_path.read_text()
    assert "INFO    p2preg.node.server: node: serving the registry facade on" in text
    assert not any(line.startswith("{") for line in text.splitlines())


def test_redact_urls_strips_queries_and_userinfo() -> None:
    from p2preg.core.logs import redact_urls

    said = ('tracker_error: ab (http://127.0.0.1:6969/announce?token=S3CRET%2Fx&n=1)[v2] '
            'udp://t:6969/announce?S3CRET "https://user:S3CRET@reg.example/v2/?a=b" done')
    out = redact_urls(said)
    assert "S3CRET" not in out
    assert "http://127.0.0.1:6969/announce?token=REDACTED&n=REDACTED)[v2]" in out
    assert "udp://t:6969/announce?REDACTED" in out and "https://REDACTED@reg.example/v2/" in out
    assert redact_urls("no url here: a=b?c") == "no url here: a=b?c"


def test_registered_secrets_never_reach_a_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatters' last defence: a secret in a message, a field or a traceback."""
    from urllib.parse import quote

    from p2preg.core.logs import SECRET_REDACTED, register_secret

    secret = 'registered-"secret"/value'
    register_secret(secret)
    for json_lines in (True, False):
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            setup_logging(json_lines=json_lines)
            log = logging.getLogger("p2preg.test")
            log.warning("url http://t/announce?token=%s", quote(secret, safe=""))
            log.warning("field", extra={"header": f"Bearer {secret}"})
            try:
                raise ValueError(f"bad token {secret}")
            except ValueError:
                log.exception("failed")
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
        text = stream.getvalue()
        assert "registered-" not in text and quote(secret, safe="") not in text, text
        # The plain format has no fields: a message and a traceback there.
        assert text.count(SECRET_REDACTED) >= (3 if json_lines else 2)
