"""deploy/: every manifest parses, has what its kind needs, and agrees with the code.

Ports, paths, environment variable names and command lines in the Dockerfile,
the Kubernetes manifests, the systemd units and the compose file are checked
against the code's own defaults (`NodeConfig`, `TrackerConfig`) and parsed by
the real `p2preg` argument parser and config loader, so the code stays the one
source of truth. `kubectl kustomize` renders the overlay where kubectl exists.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2preg import __version__
from p2preg.cli import build_parser
from p2preg.core.config import ENV_PREFIX, HostPort, load
from p2preg.node import cli as node_cli
from p2preg.node import containerd_config as cc
from p2preg.node.config import NodeConfig
from tracker import cli as tracker_cli
from tracker.config import TrackerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
EXAMPLE = K8S / "overlays" / "example"
IMAGE_NAME = "p2preg"
INSTALL_DIR = Path("/opt/p2preg")
ENTRYPOINT = INSTALL_DIR / ".venv" / "bin" / "p2preg"


# What Debian 12's containerd 1.6 package installs: CRI on, no registry config_path.
DEBIAN_CONTAINERD_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def _default(cls: type[Any], name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


NODE_LISTEN: HostPort = _default(NodeConfig, "listen")
NODE_DATA_DIR: Path = _default(NodeConfig, "data_dir")
PEER_PORT: int = _default(NodeConfig, "peer_port")
TRACKER_LISTEN: HostPort = _default(TrackerConfig, "listen")
TRACKER_DATA_DIR: Path = _default(TrackerConfig, "data_dir")


@pytest.fixture(autouse=True)
def _no_p2preg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs here come from the files under test, not from this shell."""
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def _env_field(name: str) -> str:
    assert name.startswith(ENV_PREFIX), name
    return name[len(ENV_PREFIX) :].lower()


# -- the image -----------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_the_image_installs_with_the_script_ci_runs() -> None:
    steps = _dockerfile()
    runs = [args for op, args in steps if op == "RUN"]
    assert runs == ["bash scripts/install.sh"], "one install step: scripts/install.sh"
    # The whole tree is in place before the script runs, as in a CI checkout.
    first_stage = steps[: next(i for i, (op, _) in enumerate(steps) if op == "RUN")]
    assert ("COPY", ". .") in first_stage
    assert ("WORKDIR", str(INSTALL_DIR)) in first_stage
    assert "pip install" not in (DEPLOY / "Dockerfile").read_text()
    # …and that script is what CI runs: .ci/run → scripts/test.sh → scripts/install.sh.
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "exec bash scripts/test.sh" in ci
    test_sh = (ROOT / "scripts" / "test.sh").read_text().splitlines()
    assert "bash scripts/install.sh" in test_sh


def test_the_image_matches_the_code() -> None:
    steps = _dockerfile()
    froms = [args.split()[0] for op, args in steps if op == "FROM"]
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=3.11"
    assert froms and all(f.startswith("python:3.11-") for f in froms)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert ("ENTRYPOINT", '["p2preg"]') in steps and "p2preg" in scripts
    exposed = {int(p) for op, args in steps if op == "EXPOSE" for p in args.split()}
    metrics = HostPort.from_config(_toml(BASE / "node.toml")["metrics_listen"]).port
    assert exposed == {NODE_LISTEN.port, metrics, PEER_PORT, TRACKER_LISTEN.port}
    assert ("ENV", f"PATH={INSTALL_DIR}/.venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 "
            "PYTHONUNBUFFERED=1") in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".venv", ".git", "deploy/kubernetes/overlays/*/cluster-token"):
        assert entry in ignored


# -- Kubernetes ------------------------------------------------------------------------


def _kustomizations() -> Iterator[Path]:
    yield from sorted(K8S.rglob("kustomization.yaml"))


def test_every_kustomization_names_files_that_exist() -> None:
    seen = list(_kustomizations())
    assert {p.parent for p in seen} == {BASE, EXAMPLE}
    for path in seen:
        (k,) = _yaml_docs(path)
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert k["kind"] == "Kustomization"
        for res in k.get("resources", []):
            target = (path.parent / res).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (path, res)
        for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            for entry in gen.get("files", []):
                source = path.parent / (entry.partition("=")[2] if "=" in entry else entry)
                if source.name == "cluster-token":
                    # Made per cluster, never committed.
                    ignore = (path.parent / ".gitignore").read_text().splitlines()
                    assert "cluster-token" in ignore
                    continue
                assert source.is_file(), (path, entry)


def _base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    (k,) = _yaml_docs(BASE / "kustomization.yaml")
    objects = {}
    for res in k["resources"]:
        for doc in _yaml_docs(BASE / res):
            assert doc.get("apiVersion") and doc.get("kind"), (res, doc)
            assert doc["metadata"].get("name"), res
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def _toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _workloads() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    objects = _base_objects()
    return (
        objects["DaemonSet", "p2preg-node"],
        objects["StatefulSet", "p2preg-tracker"],
        objects["Service", "p2preg-tracker"],
    )


def test_the_base_has_every_piece_and_each_is_well_formed() -> None:
    objects = _base_objects()
    kinds = {kind for kind, _ in objects}
    assert kinds == {"Namespace", "DaemonSet", "StatefulSet", "Service"}
    (k,) = _yaml_docs(BASE / "kustomization.yaml")
    assert objects["Namespace", k["namespace"]]
    for (kind, _), obj in objects.items():
        if kind not in ("DaemonSet", "StatefulSet"):
            continue
        spec = obj["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for c in _containers(obj):
            assert c["image"] == f"{IMAGE_NAME}:{__version__}", c["name"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            assert c["resources"]["limits"]["memory"]
        ann = spec["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        named = {p["name"]: p["containerPort"] for c in spec["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert int(ann["prometheus.io/port"]) in named.values()


def test_the_node_runs_on_the_host_network_with_the_codes_ports_and_paths() -> None:
    node, _, _ = _workloads()
    pod = node["spec"]["template"]["spec"]
    node_toml = _toml(BASE / "node.toml")
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # The facade on loopback, where only this host's containerd reaches it.
    assert HostPort.from_config(node_toml["listen"]) == NODE_LISTEN
    assert NODE_LISTEN.host == "127.0.0.1"
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["host"], get["port"]) == ("127.0.0.1", NODE_LISTEN.port)
        assert get["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics = HostPort.from_config(node_toml["metrics_listen"])
    assert ports == {"registry": NODE_LISTEN.port, "metrics": metrics.port, "bittorrent": PEER_PORT}
    assert node_toml["peer_port"] == PEER_PORT
    assert int(node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == (
        metrics.port
    )
    # The store on the host's disk, at the node's default data_dir on both sides.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["data"]["hostPath"]["path"] == str(NODE_DATA_DIR) == node_toml["data_dir"]
    assert mounts["data"] == str(NODE_DATA_DIR)
    assert volumes["config"]["configMap"]["name"] == "p2preg-node-config"
    assert mounts["config"] == "/etc/p2preg"
    # SIGTERM drains within shutdown_grace_s, before Kubernetes kills the pod.
    assert pod["terminationGracePeriodSeconds"] > node_toml["shutdown_grace_s"] + 5
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert set(env) == {"P2PREG_TRACKER_TOKEN", "P2PREG_NODE_NAME"}
    node_fields = {f.name for f in dataclasses.fields(NodeConfig)}
    assert {_env_field(n) for n in env} <= node_fields
    assert env["P2PREG_TRACKER_TOKEN"]["secretKeyRef"] == {
        "name": "p2preg-cluster-token", "key": "token"
    }


def test_the_tracker_keeps_its_state_on_a_volume_behind_a_service() -> None:
    _, tracker, service = _workloads()
    tracker_toml = _toml(BASE / "tracker.toml")
    listen = HostPort.from_config(tracker_toml["listen"])
    assert listen.port == TRACKER_LISTEN.port and listen.host == "0.0.0.0"
    assert tracker_toml["data_dir"] == str(TRACKER_DATA_DIR)
    spec = tracker["spec"]
    assert spec["replicas"] == 1 and spec["serviceName"] == service["metadata"]["name"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (container,) = spec["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == str(TRACKER_DATA_DIR)
    (port,) = container["ports"]
    assert port["containerPort"] == TRACKER_LISTEN.port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"port": port["name"], "path": "/healthz"}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"] and svc_port["port"] == TRACKER_LISTEN.port
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {"P2PREG_TOKEN": {"name": "p2preg-cluster-token", "key": "token"}}
    assert _env_field("P2PREG_TOKEN") in {f.name for f in dataclasses.fields(TrackerConfig)}
    # Nodes reach it by the Service's DNS name, on its port.
    (k,) = _yaml_docs(BASE / "kustomization.yaml")
    for toml_file in (BASE / "node.toml", EXAMPLE / "node.toml"):
        assert _toml(toml_file)["tracker"] == (
            f"http://{service['metadata']['name']}.{k['namespace']}.svc:{svc_port['port']}"
        )


def _config_path(args: list[str], local: Path) -> list[str]:
    """The container's args with its /etc/p2preg/X.toml read from the repository."""
    return [str(local) if a.startswith("/etc/p2preg/") else a for a in args]


def test_the_pods_command_lines_load_with_the_real_cli() -> None:
    node, tracker, _ = _workloads()
    init, main = _containers(node)
    args = build_parser("node").parse_args(_config_path(main["args"], BASE / "node.toml"))
    config = node_cli.config_from_args(args)
    assert config.listen == NODE_LISTEN and config.tracker
    assert config.shutdown_grace_s == _toml(BASE / "node.toml")["shutdown_grace_s"]
    (tracker_container,) = tracker["spec"]["template"]["spec"]["containers"]
    args = build_parser("tracker").parse_args(
        _config_path(tracker_container["args"], BASE / "tracker.toml")
    )
    tconfig = tracker_cli.config_from_args(args)
    assert tconfig.listen.port == TRACKER_LISTEN.port and tconfig.udp is False
    assert init["args"][0] == "containerd-config"
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert "/host/etc/containerd" in mounts and "/etc/p2preg" in mounts


def test_the_init_step_writes_hosts_toml_for_every_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs the init container's own command line against a fake host root."""
    node, _, _ = _workloads()
    init = _containers(node)[0]
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text(DEBIAN_CONTAINERD_CONFIG)
    argv = [str(host) if a == "/host" else a for a in init["args"]]
    for example in (BASE, EXAMPLE):
        args = build_parser("containerd-config").parse_args(
            _config_path(argv, example / "node.toml")
        )
        assert cc.run(args) == 0
        upstreams = _toml(example / "node.toml")["upstream"]
        for up in upstreams:
            ns, _, url = up.partition("=")
            text = (host / "etc/containerd/certs.d" / ns / "hosts.toml").read_text()
            doc = tomllib.loads(text)
            assert doc["server"] == url
            assert doc["host"] == {f"http://{NODE_LISTEN}": {"capabilities": ["pull", "resolve"]}}
    err = capsys.readouterr().err
    assert "WARNING: kubelet pulls will NOT go through p2preg" in err
    assert 'config_path = "/etc/containerd/certs.d"' in err


def test_the_example_overlay_renders_with_kustomize(tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    (tree / "overlays/example/cluster-token").write_text("0123456789abcdef\n")
    out = subprocess.run(
        ["kubectl", "kustomize", str(tree / "overlays/example")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "p2preg", d["metadata"]["name"]
    (secret,) = by_kind["Secret"]
    configmaps = {c["metadata"]["name"] for c in by_kind["ConfigMap"]}
    for workload in by_kind["DaemonSet"] + by_kind["StatefulSet"]:
        pod = workload["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == f"registry.example.com/platform/p2preg:{__version__}"
            for e in c.get("env", []):
                ref = e["valueFrom"].get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]  # the generated name
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
    (node_cm,) = [c for c in by_kind["ConfigMap"] if "node" in c["metadata"]["name"]]
    assert node_cm["data"]["node.toml"] == (EXAMPLE / "node.toml").read_text()


# -- systemd and the sample configs ---------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_the_sample_configs_load() -> None:
    node = load(NodeConfig, file=DEPLOY / "config/node.toml", env={})
    assert node.listen == NODE_LISTEN and node.data_dir == NODE_DATA_DIR
    assert node.peer_port == PEER_PORT and node.metrics_listen is not None
    tracker = load(TrackerConfig, file=DEPLOY / "config/tracker.toml", env={})
    assert tracker.listen.port == TRACKER_LISTEN.port and tracker.data_dir == TRACKER_DATA_DIR


@pytest.mark.parametrize(
    ("unit", "command", "sample", "data_dir"),
    [
        ("p2preg-node.service", "node", "node.toml", NODE_DATA_DIR),
        ("p2preg-tracker.service", "tracker", "tracker.toml", TRACKER_DATA_DIR),
    ],
)
def test_the_systemd_units_run_the_installed_command_with_the_sample_config(
    unit: str, command: str, sample: str, data_dir: Path, tmp_path: Path
) -> None:
    parsed = _unit(unit)
    service = parsed["Service"]
    assert parsed["Unit"]["Description"] and parsed["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == str(ENTRYPOINT) and argv[1] == command
    assert Path("/var/lib") / service["StateDirectory"] == data_dir
    assert service["KillSignal"] == "SIGTERM"
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", str(tmp_path)) for a in argv[1:]]
    (tmp_path / "token").write_text("secret\n")
    args = build_parser(command).parse_args(_config_path(argv, DEPLOY / "config" / sample))
    if command == "node":
        config: NodeConfig | TrackerConfig = node_cli.config_from_args(args)
        assert isinstance(config, NodeConfig)
        assert float(service["TimeoutStopSec"]) > config.shutdown_grace_s + 5
        pre = shlex.split(service["ExecStartPre"].lstrip("+"))
        assert pre[0] == str(ENTRYPOINT) and pre[1] == "containerd-config"
        assert build_parser("containerd-config").parse_args(pre[1:]).config == Path(
            "/etc/p2preg/node.toml"
        )
    else:
        config = tracker_cli.config_from_args(args)
        assert isinstance(config, TrackerConfig)
        assert config.with_token().token == "secret"
        assert service["LoadCredential"] == "token:/etc/p2preg/cluster-token"


# -- compose ---------------------------------------------------------------------------------


def test_the_compose_cluster_is_built_from_the_image_and_wired_to_itself() -> None:
    path = DEPLOY / "compose" / "compose.yaml"
    (compose,) = _yaml_docs(path)
    services = compose["services"]
    nodes = [s for s in services if s.startswith("node")]
    assert len(nodes) >= 3 and "tracker" in services and "seed" in services
    tracker = services["tracker"]
    targs = build_parser("tracker").parse_args(tracker["command"])
    tconfig = tracker_cli.config_from_args(targs)
    assert tconfig.listen.port == TRACKER_LISTEN.port
    assert tconfig.data_dir == TRACKER_DATA_DIR
    assert any(v.endswith(f":{TRACKER_DATA_DIR}") for v in tracker["volumes"])
    host_ports = set()
    for name in ["tracker", *nodes]:
        svc = services[name]
        assert svc["image"] == f"{IMAGE_NAME}:{__version__}"
        build = svc["build"]
        assert (path.parent / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        for var in svc["environment"]:
            assert _env_field(var) in {f.name for f in dataclasses.fields(
                TrackerConfig if name == "tracker" else NodeConfig)}
    seed_port = int(services["seed"]["ports"][0].rsplit(":", 1)[1])
    for name in nodes:
        svc = services[name]
        config = node_cli.config_from_args(build_parser("node").parse_args(svc["command"]))
        (published,) = svc["ports"]
        bind, host_port, container_port = published.split(":")
        assert bind == "127.0.0.1" and int(container_port) == config.listen.port
        host_ports.add(int(host_port))
        assert config.tracker == f"http://tracker:{tconfig.listen.port}"
        assert config.upstream[0].url == f"http://seed:{seed_port}"
        assert config.node_name == name and config.data_dir == NODE_DATA_DIR
        assert any(v.endswith(f":{NODE_DATA_DIR}") for v in svc["volumes"])
        assert svc["depends_on"]["tracker"]["condition"] == "service_healthy"
    assert len(host_ports) == len(nodes)
    for volume in compose["volumes"]:
        assert any(
            str(v).startswith(f"{volume}:") for s in services.values() for v in s.get("volumes", [])
        )
