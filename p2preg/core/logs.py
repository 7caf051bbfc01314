"""Log setup shared by every p2preg process: readable lines, or JSON on request.

A JSON line carries `ts`, `level`, `logger`, `msg` and any fields the call
passed with `extra=` (the blob line's digest, source, size...), so log
pipelines can filter on them without parsing the message.

It also owns keeping secrets out of logs. `redact_urls` strips the userinfo
and every query value from URLs in a text: whatever a third-party library
prints (libtorrent's tracker alerts quote the announce URL, which carries
`?token=` in a token cluster) goes through it. Behind that, every formatter
replaces the secrets registered at start (`register_secret`: the cluster
token, the admin token, registry passwords) wherever they appear in a line,
raw, URL-quoted or JSON-escaped: a last line of defence for a path nobody
thought of, not the first one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from urllib.parse import quote

from p2preg.core.config import ConfigError

# What redact_urls writes instead of a query value or a userinfo.
URL_REDACTED = "REDACTED"
# What the formatters write instead of a registered secret.
SECRET_REDACTED = "[secret]"
# A registered secret shorter than this would blank out ordinary words.
MIN_SECRET_CHARS = 6

_URL_RE = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s\"'<>]*@)?"
    r"(?P<rest>[^\s?#\"'<>]*)(?P<query>\?[^\s#\"'<>)]*)?"
)
_secrets: set[str] = set()


def _redact_url(m: re.Match[str]) -> str:
    query = m.group("query")
    userinfo = URL_REDACTED + "@" if m.group("userinfo") else ""
    redacted = ""
    if query:
        parts = (p.partition("=")[0] + "=" if "=" in p else "" for p in query[1:].split("&"))
        redacted = "?" + "&".join(part + URL_REDACTED for part in parts)
    return m.group("scheme") + userinfo + m.group("rest") + redacted


def redact_urls(text: str) -> str:
    """`text` with every URL's userinfo and query values replaced (`?token=REDACTED`)."""
    return _URL_RE.sub(_redact_url, text)


def register_secret(secret: str | None) -> None:
    """Never log `secret` from now on, in this process, in any form we can foresee."""
    if secret is None or len(secret) < MIN_SECRET_CHARS:
        return
    _secrets.update({secret, quote(secret, safe=""), json.dumps(secret)[1:-1]})


def scrub_secrets(text: str) -> str:
    """`text` with every registered secret replaced by SECRET_REDACTED."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, SECRET_REDACTED)
    return text

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub_secrets(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub_secrets(self._json(record))

    def _json(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def log_level(name: str | None) -> int:
    """`--log-level` NAME → a logging level (INFO when None); ConfigError when unknown."""
    level = logging.getLevelNamesMapping().get((name or "INFO").upper())
    if level is None:
        raise ConfigError(f"unknown log level {name!r}")
    return level


def setup_logging(*, json_lines: bool = False, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _ScrubbingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO, with URLs; ours already say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
