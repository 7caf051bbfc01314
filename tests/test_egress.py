"""Where registry credentials may go (p2preg/node/egress.py, upstream.py, credentials.py).

The rules are read as a table first; then the node's upstream client talks to
real HTTP servers on loopback (threads of this process; an https one with a
certificate from a test CA) that play a registry, a foreign token realm and a
storage backend, and record every request: each attack is tried, and the
test checks that the password did not arrive, or that nothing arrived at all.
A node with credentials that would cross the network in clear, or a
credentials file others may read, does not start.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.procs import clean_env, free_port
from harness.tlscerts import ClusterCA
from p2preg.core.config import ConfigError, load
from p2preg.core.digest import Digest
from p2preg.node.config import Credential, NodeConfig, Upstream
from p2preg.node.credentials import node_credentials, read_credentials_file
from p2preg.node.egress import Egress, is_local
from p2preg.node.errors import UpstreamError, UpstreamUnauthorized
from p2preg.node.upstream import UpstreamClient

PASSWORD = "egress-test-pw-7f3a9c"
USER = "puller"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
DIGEST = Digest.parse("sha256:" + "ab" * 32)


# -- the rules, as a table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "trusted", "target", "sent"),
    [
        ("https://reg.example", (), "https://reg.example/token", True),
        ("https://reg.example", (), "https://reg.example:8443/token", True),
        ("https://reg.example", (), "https://auth.example/token", False),
        ("https://reg.example", ("auth.example",), "https://auth.example/token", True),
        ("https://reg.example", ("auth.example",), "http://auth.example/token", False),
        ("https://reg.example", (), "http://reg.example/token", False),
        ("http://reg.example", (), "http://reg.example/token", False),
        ("http://127.0.0.1:5000", (), "http://127.0.0.1:5001/token", True),
        ("http://127.0.0.1:5000", ("127.0.0.2",), "http://127.0.0.2/token", True),
        ("http://127.0.0.1:5000", (), "http://127.0.0.2/token", False),
        ("http://127.0.0.1:5000", ("reg.example",), "http://reg.example/token", False),
    ],
)
def test_where_credentials_may_go(
    registry: str, trusted: tuple[str, ...], target: str, sent: bool
) -> None:
    assert (Egress.of(registry, trusted).credentials_refusal(target) is None) is sent


@pytest.mark.parametrize(
    ("registry", "target", "followed"),
    [
        ("https://reg.example", "https://s3.example/blob", True),
        ("https://reg.example", "http://s3.example/blob", False),
        ("https://reg.example", "https://127.0.0.1/x", False),
        ("https://reg.example", "https://127.9.9.9/x", False),
        ("https://reg.example", "https://[::1]/x", False),
        ("https://reg.example", "https://169.254.169.254/latest/meta-data", False),
        ("https://reg.example", "https://[fe80::1]/x", False),
        ("https://reg.example", "https://[::ffff:127.0.0.1]/x", False),
        ("https://reg.example", "https://localhost:2375/x", False),
        ("https://reg.example", "file:///etc/passwd", False),
        ("http://127.0.0.1:5000", "http://127.0.0.1:9000/blob", True),
        ("http://localhost:5000", "http://169.254.1.1/blob", True),
    ],
)
def test_which_redirects_and_realms_are_followed(
    registry: str, target: str, followed: bool
) -> None:
    assert (Egress.of(registry).target_refusal(target) is None) is followed


def test_local_addresses() -> None:
    assert all(map(is_local, ["127.0.0.1", "::1", "169.254.0.9", "fe80::2", "LocalHost"]))
    assert not any(map(is_local, ["10.0.0.1", "198.18.0.1", "2001:db8::1", "reg.example"]))


# -- real servers on loopback ------------------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


Answer = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


@dataclass
class Server:
    url: str
    seen: list[Seen] = field(default_factory=list)

    def passwords_seen(self) -> list[str]:
        return [s.path for s in self.seen if s.headers.get("authorization", "") == BASIC]


@contextmanager
def serve(answer: Answer, *, host: str = "127.0.0.1", tls: Path | None = None) -> Iterator[Server]:
    """A threaded HTTP(S) server answering every request with `answer`, recording each."""
    server: Server

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _any(self) -> None:
            server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, headers, body = answer(self)
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _any

    httpd = ThreadingHTTPServer((host, 0), Handler)
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls / "tls.crt", tls / "tls.key")
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    server = Server(f"{scheme}://{host}:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def bearer_registry(realm: str) -> Answer:
    """A registry that wants a bearer token from `realm` and accepts any."""

    def answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        if not h.headers.get("Authorization", "").startswith("Bearer "):
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'}, b""
        return 200, {}, b"{}"

    return answer


def token_realm(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, b'{"token": "T", "expires_in": 300}'


def _client(url: str, *, trusted: tuple[str, ...] = (), verify: Any = True) -> UpstreamClient:
    http = httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=verify, timeout=10)
    return UpstreamClient(
        Upstream("reg", url), http, credential=Credential("reg", USER, PASSWORD), retries=0,
        trusted_realms=trusted,
    )


async def test_credentials_go_to_a_foreign_realm_only_when_trusted() -> None:
    with (
        serve(token_realm, host="127.0.0.2") as realm,
        serve(bearer_registry(f"{realm.url}/token")) as registry,
    ):
        with pytest.raises(UpstreamUnauthorized, match="trusted_realms"):
            await _client(registry.url).fetch("GET", "a", "tags/list", max_bytes=100)
        assert realm.seen == []  # not even an anonymous request: the password stays home
        trusting = _client(registry.url, trusted=("127.0.0.2",))
        assert await trusting.fetch("GET", "a", "tags/list", max_bytes=100) is not None
        assert realm.passwords_seen() == ["/token?scope=repository%3Aa%3Apull&service=reg"]


async def test_an_https_registry_cannot_send_the_password_to_a_plain_http_realm(
    tmp_path: Path,
) -> None:
    ca = ClusterCA.make("egress")
    tls = ca.tls_dir(tmp_path / "tls", "tracker", "registry")
    verify = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    verify.check_hostname = False  # the test CA names no IP; the chain is still checked
    with serve(token_realm) as realm, serve(bearer_registry(f"{realm.url}/token"), tls=tls) as reg:
        client = _client(reg.url, trusted=("127.0.0.1",), verify=verify)
        with pytest.raises(UpstreamError, match="plain http"):
            await client.fetch("GET", "a", "tags/list", max_bytes=100)
        assert reg.seen and realm.seen == []


async def test_no_password_after_a_cross_host_redirect_nor_to_plain_http(tmp_path: Path) -> None:
    body = b"x" * 100
    digest = Digest.parse("sha256:" + hashlib.sha256(body).hexdigest())

    def storage(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, body

    with serve(storage, host="127.0.0.2") as other_host, serve(storage) as other_port:
        targets = iter([other_host.url, other_port.url])

        def registry_answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
            if h.headers.get("Authorization") != BASIC:
                return 401, {"WWW-Authenticate": 'Basic realm="reg"'}, b""
            return 307, {"Location": f"{next(targets)}/blob?sig=1"}, b""

        with serve(registry_answer) as registry:
            for _ in range(2):
                sink = _Sink()
                await _client(registry.url).fetch_blob("a", digest, sink)
                assert bytes(sink.data) == body
            assert registry.passwords_seen()  # the registry itself got them
            assert len(other_host.seen) == len(other_port.seen) == 1
            assert "authorization" not in other_host.seen[0].headers
            assert "authorization" not in other_port.seen[0].headers


async def test_an_https_registry_cannot_redirect_to_plain_http(tmp_path: Path) -> None:
    tls = ClusterCA.make("egress").tls_dir(tmp_path / "tls", "tracker", "registry")
    verify = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    verify.check_hostname = False

    def storage(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, b"x"

    with serve(storage) as plain:

        def registry_answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
            return 307, {"Location": f"{plain.url}/blob"}, b""

        with serve(registry_answer, tls=tls) as registry:
            with pytest.raises(UpstreamError, match="plain http"):
                await _client(registry.url, verify=verify).fetch_blob("a", DIGEST, _Sink())
            assert plain.seen == []


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def offset(self) -> int:
        return len(self.data)

    async def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def reset(self) -> None:
        self.data.clear()


# -- credentials at start ----------------------------------------------------------------


def _creds_file(tmp_path: Path, text: str, *, name: str = "creds.toml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_credentials_file_toml_or_json(tmp_path: Path) -> None:
    toml = _creds_file(tmp_path, f'[reg]\nusername = "{USER}"\npassword = "{PASSWORD}"\n')
    assert read_credentials_file(toml) == [Credential("reg", USER, PASSWORD)]
    json_file = _creds_file(
        tmp_path, f'{{"reg": {{"username": "{USER}", "password": "{PASSWORD}"}}}}',
        name="creds.json",
    )
    config = load(NodeConfig, cli={"upstream": ["reg=http://127.0.0.1:5000"],
                                   "credentials_file": str(json_file)})
    assert node_credentials(config) == {"reg": Credential("reg", USER, PASSWORD)}


@pytest.mark.parametrize(
    ("text", "mode", "upstream", "message"),
    [
        (f'[reg]\nusername = "u"\npassword = "{PASSWORD}"\n', 0o644, "http://127.0.0.1:1",
         "other users may read it"),
        ('[reg]\nusername = "u"\npassword = ""\n', 0o600, "http://127.0.0.1:1", "empty"),
        ('[reg]\nusername = "u"\n', 0o600, "http://127.0.0.1:1", "exactly username and password"),
        (f'[other]\nusername = "u"\npassword = "{PASSWORD}"\n', 0o600, "http://127.0.0.1:1",
         "not a configured upstream"),
        (f'[reg]\nusername = "u"\npassword = "{PASSWORD}"\n', 0o600, "http://198.18.0.9:5000",
         "in clear"),
        (f'[reg]\nusername = "u"\npassword = "{PASSWORD}" oops\n', 0o600, "http://127.0.0.1:1",
         "not valid TOML"),
    ],
)
def test_bad_credentials_stop_the_node_without_quoting_them(
    tmp_path: Path, text: str, mode: int, upstream: str, message: str
) -> None:
    path = _creds_file(tmp_path, text, mode=mode)
    config = load(NodeConfig, cli={"upstream": [f"reg={upstream}"],
                                   "credentials_file": str(path)})
    with pytest.raises(ConfigError, match=message) as caught:
        node_credentials(config)
    assert PASSWORD not in str(caught.value)


def test_a_node_with_credentials_for_a_plain_http_registry_does_not_start(
    tmp_path: Path,
) -> None:
    path = _creds_file(tmp_path, f'[reg]\nusername = "u"\npassword = "{PASSWORD}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "p2preg", "node", "--upstream", "reg=http://198.18.0.9:5000",
         "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}",
         "--credentials-file", str(path)],
        capture_output=True, text=True, timeout=60, env=clean_env(drop_prefixes=["P2PREG_"]),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("p2preg node: credentials for 'reg'")
    assert PASSWORD not in proc.stderr
