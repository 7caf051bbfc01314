import pytest

from p2preg.node.auth import (
    DEFAULT_TOKEN_TTL_S,
    EXPIRY_MARGIN_S,
    ChallengeError,
    TokenCache,
    parse_challenge,
    parse_token_response,
    repository_scope,
)


def test_bearer_challenge() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.params["scope"] == "repository:library/ubuntu:pull"


def test_challenge_quirks() -> None:
    c = parse_challenge('Basic realm="a \\"quoted\\" realm", charset=UTF-8')
    assert (c.scheme, c.realm, c.params["charset"]) == ("basic", 'a "quoted" realm', "UTF-8")
    assert parse_challenge("Bearer").params == {}
    with pytest.raises(ChallengeError):
        parse_challenge("")
    with pytest.raises(ChallengeError):
        parse_challenge('Bearer realm="x" garbage')


def test_token_response_and_cache() -> None:
    now = [100.0]
    cache = TokenCache(lambda: now[0])
    token = parse_token_response({"token": "t1", "expires_in": 300}, now[0])
    assert token.expires_at == 100 + 300 - EXPIRY_MARGIN_S
    scope = repository_scope("a/b")
    assert scope == "repository:a/b:pull"
    cache.put(scope, token)
    assert cache.get(scope) == "t1"
    assert cache.get(repository_scope("other")) is None
    now[0] += 300
    assert cache.get(scope) is None


def test_token_response_defaults() -> None:
    t = parse_token_response({"access_token": "x"}, 0.0)
    assert (t.value, t.expires_at) == ("x", DEFAULT_TOKEN_TTL_S - EXPIRY_MARGIN_S)
    for bad in ({}, {"token": ""}, [], "x"):
        with pytest.raises(ChallengeError):
            parse_token_response(bad, 0.0)
