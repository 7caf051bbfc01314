"""Registry token auth, sans-IO: `WWW-Authenticate` challenges and the token cache.

Owns the parsing of challenges (RFC 7235 auth-params) and the Docker token
response, and remembers tokens per scope until they expire. It never performs
a request and never logs a credential or a token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')
# The token spec's default lifetime when `expires_in` is absent.
DEFAULT_TOKEN_TTL_S = 60.0
# Renew this long before expiry so a token never lapses mid-request.
EXPIRY_MARGIN_S = 5.0


class ChallengeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge:
    """Parse one challenge, e.g. `Bearer realm="https://auth/token",service="reg"`."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        raise ChallengeError("empty WWW-Authenticate header")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None:
            raise ChallengeError(f"malformed auth-param in {header[:120]!r}")
        key, value = m.group(1).lower(), m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
        pos = m.end()
    return Challenge(scheme.lower(), params)


def repository_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float


def parse_token_response(doc: object, now: float) -> Token:
    if not isinstance(doc, dict):
        raise ChallengeError("token response is not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise ChallengeError("token response has no token")
    ttl = doc.get("expires_in")
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
        ttl = DEFAULT_TOKEN_TTL_S
    return Token(value, now + max(float(ttl) - EXPIRY_MARGIN_S, 1.0))


class TokenCache:
    """Bearer tokens by scope; an expired token is never returned."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens: dict[str, Token] = {}

    def get(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is None:
            return None
        if token.expires_at <= self._clock():
            del self._tokens[scope]
            return None
        return token.value

    def put(self, scope: str, token: Token) -> None:
        self._tokens[scope] = token

    def drop(self, scope: str) -> None:
        self._tokens.pop(scope, None)
