"""No secret leaks from a running cluster: not to a log, a response, a file or a command line.

A real cluster — a docker-registry behind token auth with a password only the
nodes' credentials file holds, a tracker, three nodes, every process logging
JSON at DEBUG — pulls an image through the swarm; then the tracker is killed
and the nodes pull a second image from upstream, so each node's announce
relay logs its failed batches naming the tracker (the cluster token rides in
a header, never in a URL), and the tracker is started again on the same
port. Then every log line, every response the test could ask for
(errors included), every file in the data directories (but the admin token
file itself) and every process's command line are searched for the cluster
token, each node's admin token and the registry password, raw and URL-quoted.
The test checks that the failures it relies on were logged, naming the
tracker's URL, so the search below has the lines an outage writes.

`mode` "tls" runs the same cluster with certificates instead of a token: a
cluster CA, a tracker whose certificate names 127.0.0.1, each node with its
own certificate, the tracker's protocol over mutual TLS. There the secrets are
also every private key (each tls.key, the CA's key), searched for whole, as
the scalar's hex, and as each base64 line of the PEM that holds a byte of the
scalar; responses from the tracker's main
port are read with a node's certificate, and its plain metrics listener too.
"""

from __future__ import annotations

import base64
import json
import secrets
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.images import OciLayout
from harness.node import NodeProcess, open_node
from harness.procs import Process, free_port, wait_until
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA, client_ssl_context
from harness.tracker import TrackerProcess, open_tracker
from tests.conftest import ImageVariant
from tests.fixtures.cluster import kill9
from tests.fixtures.token_issuer import open_token_issuer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
USER = "leak-test-puller"
MODES = ["token", "tls"]


def _secrets_in(text: str, secrets_: dict[str, str]) -> list[str]:
    found = []
    for name, value in secrets_.items():
        for form in {value, quote(value, safe="")}:
            if form in text:
                found.append(name)
    return found


def _json_lines(process: Process) -> list[dict[str, object]]:
    lines = [line for line in process.log_path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # JSON only: a stray line would fail here


def _key_secrets(pems: dict[str, bytes]) -> dict[str, str]:
    """Each key whole, its private scalar in hex, and each base64 line of the PEM that
    carries a byte of that scalar (a log may quote a fragment). Lines of only the
    public point are left out: every certificate carries those bytes too."""
    out = {}
    for name, pem in pems.items():
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), name
        scalar = key.private_numbers().private_value.to_bytes(key.curve.key_size // 8, "big")
        lines = pem.decode().splitlines()[1:-1]
        der = base64.b64decode("".join(lines))
        start = der.index(scalar)
        line_bytes = len(base64.b64decode(lines[0]))
        first, last = start // line_bytes, (start + len(scalar) - 1) // line_bytes
        out[name] = pem.decode()
        out[f"{name}, scalar"] = scalar.hex()
        out.update({f"{name}, line {i}": lines[i] for i in range(first, last + 1)})
    return out


def _start_node(
    stack: ExitStack, workdir: Path, name: str, registry: Registry, tracker_url: str,
    cluster_token: str, credentials: Path, tls_dir: Path | None,
) -> NodeProcess:
    args = ["--node-name", name, "--tracker", tracker_url, "--peer-host", "127.0.0.1",
            "--peer-port", "0", "--peer-ssl-port", "0", "--p2p-min-bytes", "0",
            "--relay-refresh-s", "2",  # seeders' refreshes reach the tracker soon
            "--log-json", "--log-level", "DEBUG", "--credentials-file", str(credentials)]
    env = {"P2PREG_TRACKER_TOKEN": cluster_token} if tls_dir is None else {}
    return stack.enter_context(open_node(
        workdir / name, [f"{SEED_NS}={registry.url}"], args=tuple(args), env=env, name=name,
        tls_dir=tls_dir,
    ))


def _start_tracker(
    stack: ExitStack, workdir: Path, cluster_token: str, ports: tuple[int, int],
    tls_dir: Path | None,
) -> TrackerProcess:
    args = ("--log-json", "--log-level", "DEBUG", "--announce-interval-s", "2",
            "--min-announce-interval-s", "1", "--peer-ttl-s", "30")
    token = cluster_token if tls_dir is None else None
    return stack.enter_context(open_tracker(
        workdir, port=ports[0], token=token, args=args, tls_dir=tls_dir, metrics_port=ports[1],
    ))


def _pull(node: NodeProcess, repository: str, digests: list[str]) -> None:
    for digest in digests:
        r = httpx.get(f"{node.url}/v2/{repository}/blobs/{digest}?ns={SEED_NS}", timeout=120)
        assert r.status_code == 200, r.text


def _relay_failures(node: NodeProcess) -> list[str]:
    return [str(r["msg"]) for r in _json_lines(node.process)
            if r["logger"] == "p2preg.node.relay" and "got no tracker" in str(r["msg"])]


def _responses(
    tracker: TrackerProcess, nodes: list[NodeProcess], token: str, tls_dir: Path | None
) -> list[str]:
    """Everything an outsider or an operator can read back, error bodies included."""
    out = []
    if tracker.metrics_url is not None:
        for path in ("/metrics", "/healthz", "/v1/status"):
            r = httpx.get(tracker.metrics_url + path, timeout=10, trust_env=False)
            out.append(r.text + str(r.headers))
    verify = True if tls_dir is None else client_ssl_context(tls_dir)
    tracker_url = tracker.url
    with httpx.Client(timeout=10, trust_env=False, verify=verify) as http:
        for node in nodes:
            for path in ("/metrics", "/healthz", "/_p2preg/status", "/v2/"):
                out.append(http.get(node.url + path).text)
            out.append(http.get(node.url + "/_p2preg/status", headers=node.admin_headers()).text)
            for auth in ("Bearer not-the-token", f"Bearer {token}"):
                r = http.post(f"{node.url}/_p2preg/preheat/x/blobs/sha256:{'0' * 64}",
                              headers={"Authorization": auth})
                out.append(r.text + str(r.headers))
        for path in ("/metrics", "/healthz", "/v1/status", "/announce", "/announce?token=wrong",
                     f"/v1/metainfo/sha256:{'0' * 64}"):
            r = http.get(tracker_url + path)
            out.append(r.text + str(r.headers))
        out.append(http.get(f"{tracker_url}/v1/status",
                            headers={"Authorization": f"Bearer {token}"}).text)
    return out


def _files(directory: Path, skip: set[Path]) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(directory.rglob("*"))
            if p.is_file() and p not in skip]


@pytest.mark.parametrize("mode", MODES)
def test_no_secret_in_logs_responses_files_or_argv(
    mode: str, tmp_path: Path, image_layouts: dict[ImageVariant, OciLayout]
) -> None:
    cluster_token = "ct-" + secrets.token_urlsafe(24)
    ca = ClusterCA.make("leaks")
    certs = tmp_path / "certs"
    tracker_tls: Path | None = None
    node_tls: dict[str, Path] = {}
    if mode == "tls":
        tracker_tls = ca.tls_dir(certs / "tracker", "tracker", "t", ips=["127.0.0.1"])
        node_tls = {f"node{i}": ca.tls_dir(certs / f"node{i}", "node", f"node{i}")
                    for i in range(3)}
    password = "pw-" + secrets.token_urlsafe(24)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'["{SEED_NS}"]\nusername = "{USER}"\npassword = "{password}"\n')
    credentials.chmod(0o600)
    with ExitStack() as stack:
        issuer = stack.enter_context(
            open_token_issuer(tmp_path / "issuer", users={USER: password}, anonymous="refuse")
        )
        registry = stack.enter_context(open_registry(tmp_path / "registry",
                                                     token_auth=issuer.auth))
        first = push(image_layouts["single"], registry.host, "team/one",
                     creds=f"{USER}:{password}")
        second = push(image_layouts["index"], registry.host, "team/two",
                      creds=f"{USER}:{password}")
        ports = (free_port(), free_port())
        tracker_stack = stack.enter_context(ExitStack())
        tracker = _start_tracker(
            tracker_stack, tmp_path / "tracker", cluster_token, ports, tracker_tls
        )
        nodes = [_start_node(stack, tmp_path, f"node{i}", registry, tracker.url, cluster_token,
                             credentials, node_tls.get(f"node{i}")) for i in range(3)]
        digests = [b.digest for b in first.blobs]
        for node in nodes:
            _pull(node, first.repository, digests)
        assert nodes[2].metric("p2preg_peer_blob_bytes_total") > 0  # the swarm carried some

        # The tracker dies: the next image comes from upstream, and each node's relay
        # sends the seeds it could not publish (ordinary announces) to no tracker.
        kill9(tracker.process)
        for node in nodes:
            _pull(node, second.repository, [b.digest for b in second.blobs])
        wait_until(lambda: all(_relay_failures(n) for n in nodes), timeout_s=60,
                   what="every node's relay to log a failed batch", interval_s=0.2)
        tracker_stack.close()
        tracker = _start_tracker(stack, tmp_path / "tracker", cluster_token, ports, tracker_tls)

        admin_tokens = {n.process.name: n.admin_token_file.read_text().strip() for n in nodes}
        secret_values = {"cluster token": cluster_token, "registry password": password,
                         **{f"admin token of {k}": v for k, v in admin_tokens.items()}}
        if mode == "tls":
            keys = {"the CA's key": ca.ca.key_pem}
            keys.update({f"{d.name}'s tls.key": (d / "tls.key").read_bytes()
                         for d in certs.iterdir()})
            secret_values.update(_key_secrets(keys))

        # The failures were logged, naming the tracker.
        for node in nodes:
            failures = _relay_failures(node)
            assert any(tracker.url in f for f in failures), failures
        # Logs: every line of every process, JSON at DEBUG.
        for node in nodes:
            assert any(r["level"] == "debug" for r in _json_lines(node.process)), node
        for process in [tracker.process, *(n.process for n in nodes)]:
            text = process.log_path.read_text()
            assert not _secrets_in(text, secret_values), (process.name, process.log_path)
        # Responses, error bodies included.
        for body in _responses(tracker, nodes, cluster_token, node_tls.get("node0")):
            assert not _secrets_in(body, secret_values), body[:500]
        # Files: the data directories, but for each node's own admin token
        # file, and the certificates, but for the key files themselves.
        skip = {n.admin_token_file for n in nodes} | set(certs.rglob("tls.key"))
        for directory in [tracker.data_dir, *(n.data_dir for n in nodes), certs]:
            for path, data in _files(directory, skip):
                text = data.decode("latin-1")
                assert not _secrets_in(text, secret_values), path
        # Command lines every local user can read.
        for process in [tracker.process, *(n.process for n in nodes)]:
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
            assert not _secrets_in(cmdline, secret_values), cmdline
