"""p2preg.core.tls: a tls_dir checked at start, real handshakes over loopback, reloading."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading
from pathlib import Path

import pytest

from p2preg.core.config import ConfigError
from p2preg.core.pki import Identity, Issued, issue, make_ca
from p2preg.core.tls import (
    ReloadingTLS,
    TLSFiles,
    client_context,
    load_tls_dir,
    peer_identity,
    server_context,
)

NOW = dt.datetime.now(dt.UTC)
PAST = NOW - dt.timedelta(days=10)


@pytest.fixture(scope="module")
def ca() -> Issued:
    # Made in the past, so certificates issued "last week" still chain to it.
    return make_ca("test", now=PAST)


def _tls_dir(path: Path, ca: Issued, leaf: Issued) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    files = TLSFiles.in_dir(path)
    files.cert.write_bytes(leaf.cert_pem)
    files.key.write_bytes(leaf.key_pem)
    files.ca.write_bytes(ca.cert_pem)
    files.key.chmod(0o600)
    return path


def _node(tmp: Path, ca: Issued, name: str = "n1", **kw: object) -> Path:
    return _tls_dir(tmp / name, ca, issue(ca, Identity("test", "node", name), **kw))  # type: ignore[arg-type]


def _tracker(tmp: Path, ca: Issued) -> Path:
    leaf = issue(ca, Identity("test", "tracker", "t"), ips=["127.0.0.1"], dns=["localhost"])
    return _tls_dir(tmp / "tracker", ca, leaf)


Outcome = Identity | BaseException
# The protocol version of each client handshake that completed, latest last.
versions: list[str | None] = []


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[Outcome, Outcome]:
    """One TLS connection over loopback: what each side saw of the other (or its error)."""
    result: dict[str, Outcome] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                result["server"] = e
                return
            with conn:
                conn.settimeout(10)
                try:
                    with server.wrap_socket(conn, server_side=True) as s:
                        result["server"] = peer_identity(s)
                        s.sendall(b"ok")
                except (OSError, ConfigError) as e:
                    result["server"] = e

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname="127.0.0.1") as c,
            ):
                seen = peer_identity(c)
                # Under TLS 1.3 the server's refusal of the client's
                # certificate arrives after the client's handshake is done.
                reply = c.recv(2)
                result["client"] = seen if reply == b"ok" else EOFError("no reply")
                versions.append(c.version())
        except OSError as e:
            result["client"] = e
        finally:
            thread.join(15)
    assert not thread.is_alive()
    return result["server"], result["client"]


def test_two_issued_certificates_shake_hands_over_tls13(tmp_path: Path, ca: Issued) -> None:
    tracker = load_tls_dir(_tracker(tmp_path, ca), role="tracker")
    node = load_tls_dir(_node(tmp_path, ca), role="node")
    server, client = server_context(tracker), client_context(node)
    assert server.verify_mode == ssl.CERT_REQUIRED and client.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname
    seen_by_server, seen_by_client = _handshake(server, client)
    assert seen_by_server == Identity("test", "node", "n1")
    assert seen_by_client == Identity("test", "tracker", "t")
    assert versions[-1] == "TLSv1.3"
    assert node.identity == Identity("test", "node", "n1")
    assert (node.files.cert.name, node.files.key.name, node.files.ca.name) == (
        "tls.crt",
        "tls.key",
        "ca.crt",
    )


def test_tls12_only_suites_are_forward_secret_aead(tmp_path: Path, ca: Issued) -> None:
    ctx = server_context(load_tls_dir(_tracker(tmp_path, ca)))
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)


def test_a_client_from_another_ca_is_refused(tmp_path: Path, ca: Issued) -> None:
    server = server_context(load_tls_dir(_tracker(tmp_path, ca)))
    other = make_ca("test", now=PAST)
    # The intruder trusts our CA, so only its own certificate is in question.
    intruder = _tls_dir(tmp_path / "x", other, issue(other, Identity("test", "node", "x")))
    (intruder / "ca.crt").write_bytes(ca.cert_pem + other.cert_pem)
    seen_by_server, seen_by_client = _handshake(server, client_context(load_tls_dir(intruder)))
    assert isinstance(seen_by_server, ssl.SSLError)
    assert "certificate verify failed" in str(seen_by_server)
    assert isinstance(seen_by_client, OSError)


def test_an_expired_client_certificate_is_refused(tmp_path: Path, ca: Issued) -> None:
    server = server_context(load_tls_dir(_tracker(tmp_path, ca)))
    old = _node(tmp_path, ca, days=2, now=PAST)
    # Built as it was while still valid; the handshake happens today.
    client = client_context(load_tls_dir(old, now=PAST + dt.timedelta(days=1)))
    seen_by_server, seen_by_client = _handshake(server, client)
    assert isinstance(seen_by_server, ssl.SSLError)
    assert "certificate has expired" in str(seen_by_server)
    assert isinstance(seen_by_client, OSError)


def test_a_client_without_a_certificate_is_refused(tmp_path: Path, ca: Issued) -> None:
    server = server_context(load_tls_dir(_tracker(tmp_path, ca)))
    bare = ssl.create_default_context(cadata=ca.cert_pem.decode())
    seen_by_server, seen_by_client = _handshake(server, bare)
    assert isinstance(seen_by_server, ssl.SSLError)
    assert "peer did not return a certificate" in str(seen_by_server)
    assert isinstance(seen_by_client, OSError)


def test_a_node_certificate_cannot_pass_for_the_tracker_by_name(tmp_path: Path, ca: Issued) -> None:
    """Its `*` DNS SAN matches no hostname, so the client's hostname check refuses it."""
    impostor = server_context(load_tls_dir(_node(tmp_path, ca, "imp")))
    client = client_context(load_tls_dir(_node(tmp_path, ca, "n1")))
    seen_by_server, seen_by_client = _handshake(impostor, client)
    assert isinstance(seen_by_client, ssl.SSLCertVerificationError)
    assert "IP address mismatch" in str(seen_by_client)
    assert isinstance(seen_by_server, OSError)


def _refusal(tls_dir: Path, **kw: object) -> str:
    with pytest.raises(ConfigError) as e:
        load_tls_dir(tls_dir, **kw)  # type: ignore[arg-type]
    return str(e.value)


def test_a_bad_tls_dir_is_refused_naming_the_file_and_why(tmp_path: Path, ca: Issued) -> None:
    d = _node(tmp_path, ca)
    key_line = (d / "tls.key").read_text().splitlines()[1]
    assert _refusal(tmp_path / "none") == f"tls_dir {tmp_path / 'none'}: not a directory"
    assert _refusal(d, role="tracker").startswith(f"{d / 'tls.crt'}: a node certificate")

    other = make_ca("test", now=PAST)
    foreign = _tls_dir(tmp_path / "foreign", ca, issue(other, Identity("test", "node", "f")))
    assert _refusal(foreign).startswith(f"{foreign / 'tls.crt'}: certificate (")
    assert "is not signed by the given CA" in _refusal(foreign)

    expired = _node(tmp_path, ca, "old", days=1, now=PAST)
    assert _refusal(expired).startswith(f"{expired / 'tls.crt'}: certificate expired ")

    mismatched = _node(tmp_path, ca, "mm")
    (mismatched / "tls.key").write_bytes(issue(ca, Identity("test", "node", "z")).key_pem)
    message = _refusal(mismatched)
    assert message == f"{mismatched / 'tls.key'}: the key does not belong to the certificate"
    assert key_line not in message

    (d / "ca.crt").write_bytes(b"not pem")
    assert _refusal(d) == f"{d / 'ca.crt'}: CA certificate: not a PEM certificate"
    (d / "ca.crt").unlink()
    assert _refusal(d) == f"{d / 'ca.crt'}: no such file"
    (d / "tls.key").unlink()
    (d / "tls.key").mkdir()  # unreadable even to root, unlike a chmod 000 file
    assert _refusal(d) == f"{d / 'tls.key'}: cannot read it: Is a directory"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_renewed_files_are_picked_up_without_a_restart(
    tmp_path: Path, ca: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_context(load_tls_dir(_tracker(tmp_path, ca)))
    d = _node(tmp_path, ca, "n1")
    clock = Clock()
    tls = ReloadingTLS(d, role="node", check_interval_s=5.0, clock=clock)
    first = tls.client_context()
    assert tls.generation == 0 and tls.identity.name == "n1"
    assert tls.client_context() is first  # the hot path hands out the same object
    assert _handshake(server, first)[0] == Identity("test", "node", "n1")

    _tls_dir(d, ca, issue(ca, Identity("test", "node", "n1-renewed")))
    clock.now = 4.9
    assert tls.client_context() is first  # not checked before the interval is up
    clock.now = 5.0
    renewed = tls.client_context()
    assert renewed is not first and tls.generation == 1
    assert tls.identity.name == "n1-renewed" and tls.server_context() is not None
    assert _handshake(server, renewed)[0] == Identity("test", "node", "n1-renewed")

    # A renewal caught half-written (a key from another pair) is not used.
    (d / "tls.key").write_bytes(issue(ca, Identity("test", "node", "q")).key_pem)
    with caplog.at_level(logging.WARNING, logger="p2preg.core.tls"):
        clock.now = 10.0
        assert tls.client_context() is renewed
        clock.now = 15.0
        assert tls.client_context() is renewed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not belong to the certificate" in warnings[0]
    assert tls.generation == 1

    _tls_dir(d, ca, issue(ca, Identity("test", "node", "n1-third")))
    clock.now = 20.0
    assert tls.identity.name == "n1-third" and tls.generation == 2


def test_a_reloader_refuses_a_bad_tls_dir_at_start(tmp_path: Path, ca: Issued) -> None:
    d = _node(tmp_path, ca)
    (d / "tls.crt").unlink()
    with pytest.raises(ConfigError, match=r"tls\.crt: no such file"):
        ReloadingTLS(d)


def test_a_kubernetes_secret_swap_is_picked_up(tmp_path: Path, ca: Issued) -> None:
    """The kubelet mounts each file as a symlink through `..data`, swapped atomically."""
    mount = tmp_path / "mount"
    mount.mkdir()
    for version, name in (("..v1", "n1"), ("..v2", "n1-renewed")):
        _tls_dir(mount / version, ca, issue(ca, Identity("test", "node", name)))
    (mount / "..data").symlink_to("..v1")
    for f in ("tls.crt", "tls.key", "ca.crt"):
        (mount / f).symlink_to(f"..data/{f}")
    clock = Clock()
    tls = ReloadingTLS(mount, role="node", check_interval_s=1.0, clock=clock)
    assert tls.identity.name == "n1"
    (mount / "..data_tmp").symlink_to("..v2")
    (mount / "..data_tmp").rename(mount / "..data")
    clock.now = 1.0
    assert tls.identity.name == "n1-renewed" and tls.generation == 1
    assert tls.files.cert == mount / "tls.crt"  # libtorrent gets the stable path
