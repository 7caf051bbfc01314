"""deploy/: every manifest parses, agrees with the code, and is locked down.

Ports, paths and command lines in the Dockerfile, the Kubernetes manifests,
the systemd units and the compose file are checked against the code's own
defaults (`NodeConfig`, `TrackerConfig`) and loaded by the real `p2preg`
argument parser and config loader, with real certificates where a command
line names a tls_dir, so the code stays the one source of truth. The
Kubernetes checks read what `kubectl kustomize` renders. The security claims
of docs/DEPLOY.md are each tried here: the pods' securityContexts, the one
root init container, no service-account token, the NetworkPolicies, the
certificate volumes where `--tls-dir` points, no token and no `--insecure`
anywhere; the image built from a wheel and run as 65532; the units' sandbox.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.tlscerts import ClusterCA
from p2preg import __version__
from p2preg.cli import build_parser
from p2preg.core.config import ENV_PREFIX, ConfigError, HostPort, load
from p2preg.core.pki import Identity
from p2preg.core.tls import load_tls_dir
from p2preg.node import cli as node_cli
from p2preg.node import containerd_check as ck
from p2preg.node import containerd_config as cc
from p2preg.node.config import NodeConfig
from tracker import cli as tracker_cli
from tracker.config import TrackerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
EXAMPLE = K8S / "overlays" / "example"
REDIS_SENTINEL = K8S / "overlays" / "redis-sentinel"
COMPONENTS = K8S / "components"
IMAGE_NAME = "p2preg"
INSTALL_DIR = Path("/opt/p2preg")
ENTRYPOINT = INSTALL_DIR / ".venv" / "bin" / "p2preg"
# The unprivileged user of the image, the pods, and the files handed to them.
UID = 65532
TRACKER_METRICS_PORT = 6970
CSI = "csi.cert-manager.io"
ISSUER = "p2preg-ca"


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
# The node's TLS peer port (its `s` listen interface), the only one it opens with a tls_dir.
PEER_TLS_PORT: int = _default(NodeConfig, "peer_ssl_port")
TRACKER_LISTEN: HostPort = _default(TrackerConfig, "listen")
TRACKER_DATA_DIR: Path = _default(TrackerConfig, "data_dir")


@pytest.fixture(autouse=True)
def _no_p2preg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs here come from the files under test, not from this shell."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return ClusterCA.make("default")


def _tls_dir(ca: ClusterCA, out: Path, role: str, name: str) -> Path:
    return ca.tls_dir(out / f"{role}-{name}", role, name)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def _toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value after `flag` replaced (a path inside the pod, say)."""
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _config_path(args: list[str], local: Path) -> list[str]:
    """The container's args with its /etc/p2preg/X.toml read from the repository."""
    return [str(local) if a.startswith("/etc/p2preg/") else a for a in args]


# -- the image -----------------------------------------------------------------------


def _dockerfile() -> list[list[tuple[str, str]]]:
    """deploy/Dockerfile's stages, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            step = (word.upper(), " ".join(rest.split()))
            if step[0] == "FROM":
                stages.append([])
            assert stages, "the Dockerfile starts with FROM"
            stages[-1].append(step)
    return stages


def test_the_image_builds_a_wheel_and_installs_only_that() -> None:
    stages = _dockerfile()
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, runtime = stages
    assert build[0][1].endswith(" AS build")
    build_runs = [a for op, a in build if op == "RUN"]
    assert build_runs == ["python -m pip wheel --wheel-dir /wheels --constraint constraints.txt ."]
    (install,) = [a for op, a in runtime if op == "RUN"]
    # The wheels come in by a bind mount for that one step: no layer holds them.
    assert install.startswith("--mount=type=bind,from=build,source=/wheels,target=/wheels ")
    assert "--no-index --find-links /wheels p2preg" in install and "--no-cache-dir" in install
    assert "pip uninstall --yes --disable-pip-version-check pip setuptools wheel" in install
    assert not [a for op, a in runtime if op in ("COPY", "ADD")], "nothing but the wheels"
    text = (DEPLOY / "Dockerfile").read_text()
    for banned in (" -e ", "--editable", "[dev]", "COPY . .", "apt-get", "gcc", "build-essential"):
        assert banned not in text, banned
    # It runs as 65532 from the last build step on.
    ops = [op for op, _ in runtime]
    assert ("USER", f"{UID}:{UID}") in runtime
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    assert f"-o {UID} -g {UID} {NODE_DATA_DIR} {TRACKER_DATA_DIR}" in install


def test_the_image_matches_the_code() -> None:
    stages = _dockerfile()
    steps = [s for stage in stages for s in stage]
    froms = [args.split()[0] for op, args in steps if op == "FROM"]
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=3.11"
    assert froms and all(f.startswith("python:3.11-") for f in froms)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert ("ENTRYPOINT", '["p2preg"]') in stages[-1] and "p2preg" in scripts
    exposed = {int(p) for op, args in steps if op == "EXPOSE" for p in args.split()}
    metrics = HostPort.from_config(_toml(BASE / "node.toml")["metrics_listen"]).port
    assert exposed == {
        NODE_LISTEN.port, metrics, PEER_TLS_PORT, TRACKER_LISTEN.port,
        TRACKER_METRICS_PORT,
    }
    assert ("ENV", f"PATH={INSTALL_DIR}/.venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 "
            "PYTHONUNBUFFERED=1") in stages[-1]
    assert ("STOPSIGNAL", "SIGTERM") in stages[-1]


def test_the_wheel_the_image_installs_holds_the_product_and_nothing_else(tmp_path: Path) -> None:
    """Builds the wheel from exactly what the build stage copies, as the build stage does."""
    src = tmp_path / "src"
    src.mkdir()
    (build, _) = _dockerfile()
    for op, args in build:
        if op == "COPY":
            *sources, _dest = args.split()
            for s in sources:
                path = ROOT / s
                if path.is_dir():
                    shutil.copytree(path, src / s, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(path, src / s)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--disable-pip-version-check", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "wheels").glob("p2preg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"p2preg", "tracker", f"p2preg-{__version__}.dist-info"}
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "p2preg = p2preg.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert "p2preg/node/server.py" in names and "tracker/serve.py" in names


def test_the_build_context_leaves_keys_and_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".venv", ".git", "**/*.key", "**/tls.crt", "**/ca.crt"):
        assert entry in ignored
    assert not [e for e in ignored if "token" in e], "nothing in the cluster uses a token"


# -- Kubernetes: the files -------------------------------------------------------------------


def _kustomizations() -> Iterator[Path]:
    yield from sorted(K8S.rglob("kustomization.yaml"))


def test_every_kustomization_names_files_that_exist() -> None:
    seen = list(_kustomizations())
    assert {p.parent for p in seen} == {
        BASE, EXAMPLE, REDIS_SENTINEL, COMPONENTS / "cluster-ca", COMPONENTS / "secret-certs",
        COMPONENTS / "monitoring",
    }
    for path in seen:
        (k,) = _yaml_docs(path)
        assert (k["apiVersion"], k["kind"]) in {
            ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
            ("kustomize.config.k8s.io/v1alpha1", "Component"),
        }
        for res in k.get("resources", []) + k.get("components", []):
            target = (path.parent / res).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (path, res)
        assert "secretGenerator" not in k, "no secret in the repository"
        for gen in k.get("configMapGenerator", []):
            for entry in gen.get("files", []):
                assert (path.parent / entry.rpartition("=")[2]).is_file(), (path, entry)


def _render(overlay: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    objects = {}
    for d in yaml.safe_load_all(out):
        if d:
            objects[d["kind"], d["metadata"]["name"]] = d
    return objects


def _render_with(tmp: Path, components: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """The base with `components`, from a copy of the tree (kustomize wants relative paths)."""
    tree = tmp / "kubernetes"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "under-test"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        "components": [f"../../components/{c}" for c in components],
    }))
    return _render(overlay)


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return _render(BASE)


@pytest.fixture(scope="module")
def example() -> dict[tuple[str, str], dict[str, Any]]:
    return _render(EXAMPLE)


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod(workload)
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _workloads(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return (
        objects["DaemonSet", "p2preg-node"],
        objects["Deployment", "p2preg-tracker"],
        objects["Service", "p2preg-tracker"],
    )


def _node_toml(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [o for (kind, name), o in objects.items()
             if kind == "ConfigMap" and name.startswith("p2preg-node-config")]
    return tomllib.loads(cm["data"]["node.toml"])


def test_the_base_has_every_piece_and_each_is_well_formed(base: dict[Any, Any]) -> None:
    kinds = {kind for kind, _ in base}
    assert kinds == {
        "Namespace", "ConfigMap", "DaemonSet", "Deployment", "Service", "Certificate",
        "NetworkPolicy", "PodDisruptionBudget",
    }
    for (kind, _), obj in base.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "p2preg"
        if kind not in ("DaemonSet", "Deployment"):
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
        ports = {p["containerPort"] for c in _pod(obj)["containers"] for p in c.get("ports", [])}
        assert int(ann["prometheus.io/port"]) in ports


# -- Kubernetes: least privilege --------------------------------------------------------------


def _locked_down(sc: dict[str, Any], what: str) -> None:
    assert sc["allowPrivilegeEscalation"] is False, what
    assert sc["readOnlyRootFilesystem"] is True, what
    assert sc["capabilities"]["drop"] == ["ALL"], what
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
    assert not sc.get("privileged"), what


def test_every_container_runs_unprivileged_but_the_init_step(base: dict[Any, Any]) -> None:
    node, tracker, _ = _workloads(base)
    for workload in (node, tracker):
        pod = _pod(workload)
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostPID") and not pod.get("hostIPC")
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == psc["runAsGroup"] == UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            _locked_down(sc, c["name"])
            assert "add" not in sc["capabilities"], c["name"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID, c["name"]
    # The one root container: the node's init step, with CHOWN only.
    roots = [
        (w["metadata"]["name"], c["name"]) for w in (node, tracker) for c in _containers(w)
        if c["securityContext"].get("runAsUser", _pod(w)["securityContext"]["runAsUser"]) == 0
    ]
    assert roots == [("p2preg-node", "host-setup")]
    (init,) = _pod(node)["initContainers"]
    _locked_down(init["securityContext"], "host-setup")
    assert init["securityContext"]["capabilities"]["add"] == ["CHOWN"]
    assert init["securityContext"]["runAsNonRoot"] is False
    assert "initContainers" not in _pod(tracker)


def _init_steps(init: dict[str, Any]) -> list[list[str]]:
    """The init container's shell script as argv lists, one per `&&` step."""
    assert init["command"] == ["/bin/sh", "-ec"]
    (script,) = init["args"]
    steps: list[list[str]] = [[]]
    for word in shlex.split(script):
        if word == "&&":
            steps.append([])
        else:
            steps[-1].append(word)
    return steps


def test_the_init_step_hands_the_host_store_to_the_node_user(base: dict[Any, Any]) -> None:
    node, _, _ = _workloads(base)
    (init,) = _pod(node)["initContainers"]
    configure, chown = _init_steps(init)
    assert configure[:2] == ["p2preg", "containerd-config"]
    assert chown == ["chown", "-R", f"{UID}:{UID}", str(NODE_DATA_DIR)]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {
        "config": "/etc/p2preg", "containerd-etc": "/host/etc/containerd",
        "data": str(NODE_DATA_DIR),
    }
    assert "tls" not in mounts, "the root step never sees the node's key"
    volumes = {v["name"]: v for v in _pod(node)["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == str(NODE_DATA_DIR)


def test_the_node_runs_on_the_host_network_with_the_codes_ports_and_paths(
    base: dict[Any, Any],
) -> None:
    node, _, _ = _workloads(base)
    pod = _pod(node)
    node_toml = _toml(BASE / "node.toml")
    assert _node_toml(base) == node_toml
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
    assert ports == {
        "registry": NODE_LISTEN.port, "metrics": metrics.port, "bittorrent-tls": PEER_TLS_PORT,
    }
    # A TLS node opens only its SSL peer port: that is the port the base names.
    assert node_toml["peer_ssl_port"] == PEER_TLS_PORT and "peer_port" not in node_toml
    assert int(node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == (
        metrics.port
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["data"]["hostPath"]["path"] == str(NODE_DATA_DIR) == node_toml["data_dir"]
    assert mounts["data"] == str(NODE_DATA_DIR)
    assert volumes["config"]["configMap"]["name"].startswith("p2preg-node-config")
    assert mounts["config"] == "/etc/p2preg"
    # A read-only root: /tmp is a small private memory volume.
    assert volumes["tmp"]["emptyDir"]["medium"] == "Memory" and mounts["tmp"] == "/tmp"
    # SIGTERM drains within shutdown_grace_s, before Kubernetes kills the pod.
    assert pod["terminationGracePeriodSeconds"] > node_toml["shutdown_grace_s"] + 5
    # No environment at all: no token, and the node's name is its certificate's.
    assert "env" not in container and "envFrom" not in container


def test_the_node_reads_the_hosts_containerd_config_the_init_step_checked(
    base: dict[Any, Any], example: dict[Any, Any], tmp_path: Path
) -> None:
    """kubelet pulls that bypass the node show as p2preg_containerd_config_ok 0, which needs
    the host's real config.toml in the node's container: mounted read-only, named in node.toml."""
    node, _, _ = _workloads(base)
    pod = _pod(node)
    (container,) = pod["containers"]
    (init,) = pod["initContainers"]
    volume = {v["name"]: v for v in pod["volumes"]}["containerd-etc"]
    assert volume["hostPath"]["path"] == str(cc.DEFAULT_CONTAINERD_CONFIG.parent)
    (mine,) = [m for m in container["volumeMounts"] if m["name"] == "containerd-etc"]
    (inits,) = [m for m in init["volumeMounts"] if m["name"] == "containerd-etc"]
    assert mine["readOnly"] is True and not inits.get("readOnly")  # only the init step writes
    assert mine["mountPath"] == inits["mountPath"]
    configure = _init_steps(init)[0]
    host_root = Path(_arg(configure, "--host-root"))
    checked = cc.on_host(host_root, Path(_arg(configure, "--containerd-config")))
    assert Path(mine["mountPath"]) == cc.on_host(host_root, cc.DEFAULT_CONTAINERD_CONFIG.parent)
    for objects in (base, example):
        assert Path(_node_toml(objects)["containerd_config"]) == checked
    config = load(NodeConfig, env={}, file=BASE / "node.toml")
    assert config.containerd_config == checked and config.containerd_version is None
    assert config.containerd_hosts_dir == Path(_arg(configure, "--hosts-dir"))
    # What that node reports, its mount played by a directory here: Debian's config as
    # shipped, then with the key the init step asks for.
    seen = tmp_path / checked.relative_to(checked.anchor)
    seen.parent.mkdir(parents=True)
    seen.write_text(DEBIAN_CONTAINERD_CONFIG)
    watch = ck.watch_host(seen, config.containerd_hosts_dir, "1.6.20")
    before = watch()
    assert before["ok"] is False and "kubelet pulls bypass the node" in str(before["reason"])
    seen.write_text(
        DEBIAN_CONTAINERD_CONFIG + '\n  [plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'    config_path = "{config.containerd_hosts_dir}"\n'
    )
    assert watch()["ok"] is True


def test_three_tracker_replicas_share_a_store_and_only_the_serving_one_is_ready(
    base: dict[Any, Any],
) -> None:
    _, tracker, service = _workloads(base)
    tracker_toml = _toml(BASE / "tracker.toml")
    listen = HostPort.from_config(tracker_toml["listen"])
    assert listen.port == TRACKER_LISTEN.port and listen.host == "0.0.0.0"
    assert tracker_toml["data_dir"] == str(TRACKER_DATA_DIR)
    assert tracker_toml["udp"] is False, "BEP 15 carries no certificate"
    spec = tracker["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    # No claim: the state is in the store.
    assert "volumeClaimTemplates" not in spec
    assert not [v for v in _pod(tracker)["volumes"] if "persistentVolumeClaim" in v]
    assert tracker_toml["store"].startswith("redis://")
    (container,) = spec["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == str(TRACKER_DATA_DIR)
    assert spec["template"]["spec"]["securityContext"]["fsGroup"] == UID
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": TRACKER_LISTEN.port, "metrics": TRACKER_METRICS_PORT}
    assert HostPort.from_config(_arg(container["args"], "--metrics-listen")).port == (
        TRACKER_METRICS_PORT
    )
    # The kubelet holds no client certificate: probes go to the plain metrics listener.
    # Standbys are alive but not ready: the Service sends only to the replica serving.
    assert container["livenessProbe"]["httpGet"] == {"port": "metrics", "path": "/healthz"}
    assert container["readinessProbe"]["httpGet"] == {"port": "metrics", "path": "/readyz"}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == "https" and svc_port["port"] == TRACKER_LISTEN.port
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    # The other replicas forward announces to the pod's own address.
    assert _arg(container["args"], "--replica-advertise") == f"$(POD_IP):{TRACKER_LISTEN.port}"
    assert _env_is_only_the_pod_ip(container)


def _env_is_only_the_pod_ip(container: dict[str, Any]) -> bool:
    """No environment but POD_IP from the downward API: no token, no secret."""
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    return "envFrom" not in container and container.get("env") == [pod_ip]


def _spread(workload: dict[str, Any]) -> None:
    """Its pods prefer distinct machines, and its budget lets one go at a time."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (term,) = _pod(workload)["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def _budget(objects: dict[tuple[str, str], dict[str, Any]], workload: dict[str, Any]) -> None:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    budgets = [o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget"
               and o["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(budgets) == 1, workload["metadata"]["name"]
    (pdb,) = budgets
    assert pdb["spec"].get("maxUnavailable") == 1 or (
        pdb["spec"].get("minAvailable") == workload["spec"]["replicas"] - 1
    )
    assert pdb["metadata"]["namespace"] == workload["metadata"]["namespace"]


def test_the_tracker_replicas_spread_and_a_drain_keeps_two(base: dict[Any, Any]) -> None:
    node, tracker, _ = _workloads(base)
    _spread(tracker)
    _budget(base, tracker)
    labels = node["spec"]["template"]["metadata"]["labels"]
    assert not [o for (kind, _), o in base.items() if kind == "PodDisruptionBudget"
                and o["spec"]["selector"]["matchLabels"].items() <= labels.items()]


# The store's keys (docs/TRACKER.md). A URL never carries a password: this
# finds one in `scheme://user:password@host`, or any `@` before the path.
STORE_KEYS = ("store", "store_password_file", "store_ca_file")
STORE_URL = re.compile(
    r"(redis|rediss)://[a-z0-9.-]+:\d+/\d+"
    r"|redis\+sentinel://[a-z0-9.-]+:\d+(,[a-z0-9.-]+:\d+)*/[a-z0-9-]+(/\d+)?"
)


def _store_wiring(objects: dict[tuple[str, str], dict[str, Any]], toml: dict[str, Any]) -> None:
    """The store URL has no password, and the password file is the Secret's `password`."""
    assert STORE_URL.fullmatch(toml["store"]), toml["store"]
    assert "@" not in toml["store"] and "password" not in toml["store"]
    _, tracker, _ = _workloads(objects)
    (container,) = _pod(tracker)["containers"]
    password_file = Path(toml["store_password_file"])
    secret = _volume_at(tracker, container, str(password_file.parent))["secret"]
    assert secret["secretName"] == "p2preg-store"
    assert password_file.name == "password" and "items" not in secret
    assert secret["defaultMode"] == 0o440
    words = " ".join(container.get("command", []) + container["args"])
    assert "redis" not in words and "password" not in words
    assert not [k for k in objects if k[0] == "Secret"], "the Secret is made, never shipped"


def test_the_store_password_comes_from_a_secret_file(base: dict[Any, Any]) -> None:
    _store_wiring(base, _toml(BASE / "tracker.toml"))


def test_the_tracker_url_is_https_to_the_service(
    base: dict[Any, Any], example: dict[Any, Any]
) -> None:
    _, _, service = _workloads(base)
    (svc_port,) = service["spec"]["ports"]
    want = (
        f"https://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:"
        f"{svc_port['port']}"
    )
    assert _node_toml(base)["tracker"] == want
    assert _node_toml(example)["tracker"] == want
    assert _node_toml(example) == _toml(EXAMPLE / "node.toml")


def test_no_token_no_secret_and_no_insecure_in_the_base(base: dict[Any, Any]) -> None:
    assert not [k for k in base if k[0] == "Secret"]
    for workload in _workloads(base)[:2]:
        for c in _containers(workload):
            words = c.get("command", []) + c.get("args", [])
            text = " ".join(words)
            for banned in ("--insecure", "--token", "token-file", "P2PREG_"):
                assert banned not in text, (c["name"], banned)
            assert "envFrom" not in c and ("env" not in c or _env_is_only_the_pod_ip(c)), c
    for (kind, _), obj in base.items():
        if kind == "ConfigMap":
            for text in obj["data"].values():
                keys = set(tomllib.loads(text))
                assert not keys & {"token", "token_file", "tracker_token", "insecure"}


# -- Kubernetes: certificates -----------------------------------------------------------------


def _volume_at(workload: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    assert mount["readOnly"] is True
    (volume,) = [v for v in _pod(workload)["volumes"] if v["name"] == mount["name"]]
    assert isinstance(volume, dict)
    return volume


def test_each_pod_reads_its_certificate_where_tls_dir_points(base: dict[Any, Any]) -> None:
    node, tracker, service = _workloads(base)
    (node_c,) = _pod(node)["containers"]
    attrs = _volume_at(node, node_c, _arg(node_c["args"], "--tls-dir"))["csi"]
    assert attrs["driver"] == CSI and attrs["readOnly"] is True
    a = attrs["volumeAttributes"]
    assert (a[f"{CSI}/issuer-name"], a[f"{CSI}/issuer-kind"]) == (ISSUER, "Issuer")
    # One identity per pod: the driver puts the pod's name in the URI SAN.
    uri = a[f"{CSI}/uri-sans"]
    assert "${POD_NAME}" in uri
    node_id = Identity.from_uri(uri.replace("${POD_NAME}", "p2preg-node-x7k2p"))
    assert (node_id.role, node_id.name) == ("node", "p2preg-node-x7k2p")
    assert a[f"{CSI}/dns-names"] == "*"
    usages = {u.strip() for u in a[f"{CSI}/key-usages"].split(",")}
    assert {"server auth", "client auth"} <= usages
    assert a[f"{CSI}/duration"] == "720h"
    # 0440 root:65532 files: the node's group, no one else's.
    assert a[f"{CSI}/fs-group"] == str(_pod(node)["securityContext"]["runAsGroup"])

    (tracker_c,) = _pod(tracker)["containers"]
    secret = _volume_at(tracker, tracker_c, _arg(tracker_c["args"], "--tls-dir"))["secret"]
    assert secret["defaultMode"] == 0o440
    cert = base["Certificate", "p2preg-tracker"]["spec"]
    assert cert["secretName"] == secret["secretName"]
    (uri,) = cert["uris"]
    tracker_id = Identity.from_uri(uri)
    assert tracker_id.role == "tracker" and tracker_id.cluster == node_id.cluster
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert {"*", f"{name}.{ns}.svc"} <= set(cert["dnsNames"])
    # client auth too: a standby replica shows it to forward the announces it fronts.
    assert {"server auth", "client auth"} <= set(cert["usages"]) and cert["duration"] == "720h"
    assert cert["issuerRef"] == {"name": ISSUER, "kind": "Issuer", "group": "cert-manager.io"}


def test_the_cluster_ca_component_makes_the_issuer_both_use(example: dict[Any, Any]) -> None:
    issuer = example["Issuer", ISSUER]["spec"]
    ca_cert = example["Certificate", "p2preg-ca"]["spec"]
    assert issuer["ca"]["secretName"] == ca_cert["secretName"]
    assert ca_cert["isCA"] is True
    # Every SSL torrent's root: renewal keeps the key (issued certificates stay valid).
    assert ca_cert["privateKey"]["rotationPolicy"] == "Never"
    assert "selfSigned" in example["Issuer", ca_cert["issuerRef"]["name"]]["spec"]
    node, _, _ = _workloads(example)
    tls = next(v for v in _pod(node)["volumes"] if v["name"] == "tls")
    assert tls["csi"]["volumeAttributes"][f"{CSI}/issuer-name"] == ISSUER
    assert example["Certificate", "p2preg-tracker"]["spec"]["issuerRef"]["name"] == ISSUER


def test_without_cert_manager_the_certificates_come_from_files(tmp_path: Path) -> None:
    objects = _render_with(tmp_path, ["secret-certs"])
    assert not [k for k in objects if k[0] == "Certificate"]
    node, tracker, _ = _workloads(objects)
    (node_c,) = _pod(node)["containers"]
    tls = _volume_at(node, node_c, _arg(node_c["args"], "--tls-dir"))
    assert tls["hostPath"] == {"path": "/etc/p2preg/tls", "type": "Directory"}
    (tracker_c,) = _pod(tracker)["containers"]
    tls = _volume_at(tracker, tracker_c, _arg(tracker_c["args"], "--tls-dir"))
    assert tls["secret"]["secretName"] == "p2preg-tracker-tls"


def test_the_pods_command_lines_load_with_the_real_cli(
    base: dict[Any, Any], ca: ClusterCA, tmp_path: Path
) -> None:
    """Each pod's args, with its certificate directory holding real files of its role."""
    node, tracker, _ = _workloads(base)
    (main,) = _pod(node)["containers"]
    argv = _replace_arg(main["args"], "--tls-dir", str(_tls_dir(ca, tmp_path, "node", "n1")))
    config = node_cli.config_from_args(
        build_parser("node").parse_args(_config_path(argv, BASE / "node.toml"))
    )
    assert config.listen == NODE_LISTEN and config.tracker == _node_toml(base)["tracker"]
    assert config.tls_dir is not None and config.insecure is False
    assert config.tracker_token is None
    assert config.shutdown_grace_s == _toml(BASE / "node.toml")["shutdown_grace_s"]
    (tracker_c,) = _pod(tracker)["containers"]
    argv = _replace_arg(
        tracker_c["args"], "--tls-dir", str(_tls_dir(ca, tmp_path, "tracker", "p2preg-tracker"))
    )
    tracker_toml = BASE / "tracker.toml"
    tconfig = tracker_cli.config_from_args(
        build_parser("tracker").parse_args(_config_path(argv, tracker_toml))
    )
    assert tconfig.listen.port == TRACKER_LISTEN.port and tconfig.udp is False
    assert tconfig.tls_dir is not None and tconfig.insecure is False and tconfig.token is None


def test_the_init_step_writes_hosts_toml_for_every_upstream(
    base: dict[Any, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs the init container's own containerd-config step against a fake host root."""
    node, _, _ = _workloads(base)
    (init,) = _pod(node)["initContainers"]
    configure = _init_steps(init)[0][1:]
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text(DEBIAN_CONTAINERD_CONFIG)
    argv = [str(host) if a == "/host" else a for a in configure]
    # As Debian ships it, kubelet pulls would ignore the files: the step refuses,
    # writes nothing, and names the key (the pod's init container fails, visibly).
    refused = build_parser("containerd-config").parse_args(_config_path(argv, BASE / "node.toml"))
    with pytest.raises(ConfigError, match=r'registry\.config_path = "/etc/containerd/certs\.d"'):
        cc.run(refused)
    assert not (host / "etc/containerd/certs.d").exists()
    (host / "etc/containerd/config.toml").write_text(
        DEBIAN_CONTAINERD_CONFIG
        + '\n  [plugins."io.containerd.grpc.v1.cri".registry]\n'
        '    config_path = "/etc/containerd/certs.d"\n'
    )
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
    assert "reads hosts.toml from /etc/containerd/certs.d" in capsys.readouterr().out


def test_the_monitoring_component_scrapes_both_metrics_listeners(
    tmp_path: Path, base: dict[Any, Any]
) -> None:
    """PodMonitors on the `metrics` port of each workload, the port Prometheus may reach."""
    assert not [k for k in base if k[0] == "PodMonitor"], "monitoring is optional"
    objects = _render_with(tmp_path, ["monitoring"])
    monitors = {name: o for (kind, name), o in objects.items() if kind == "PodMonitor"}
    node, tracker, _ = _workloads(objects)
    metrics_ports = {
        "p2preg-node": HostPort.from_config(_toml(BASE / "node.toml")["metrics_listen"]).port,
        "p2preg-tracker": TRACKER_METRICS_PORT,
    }
    assert set(monitors) == set(metrics_ports)
    policies = {name: o for (kind, name), o in objects.items() if kind == "NetworkPolicy"}
    for workload in (node, tracker):
        name = workload["metadata"]["name"]
        monitor = monitors[name]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["path"], endpoint["scheme"]) == ("/metrics", "http")
        (container,) = _pod(workload)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == metrics_ports[name]
        # The same listener the pod's annotations name, and the one port the
        # NetworkPolicy opens to Prometheus.
        ann = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(ann["prometheus.io/port"]) == metrics_ports[name]
        assert ([PROMETHEUS], {metrics_ports[name]}) in _rules(policies[name])
    # In an overlay with a namespace (as every overlay has), the monitors land in it.
    overlay = tmp_path / "kubernetes" / "overlays" / "under-test"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["namespace"] = "p2preg"
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for (kind, _), obj in _render(overlay).items():
        if kind == "PodMonitor":
            assert obj["metadata"]["namespace"] == "p2preg"


# -- Kubernetes: who may reach what ------------------------------------------------------------


def _rules(policy: dict[str, Any]) -> list[tuple[list[dict[str, Any]], set[int]]]:
    out = []
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        assert all(p["protocol"] == "TCP" for p in rule["ports"])
        out.append((rule["from"], {p["port"] for p in rule["ports"]}))
    return out


PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def test_only_nodes_reach_the_tracker_and_peers_and_only_prometheus_the_metrics(
    base: dict[Any, Any],
) -> None:
    node, tracker, _ = _workloads(base)
    node_labels = node["spec"]["template"]["metadata"]["labels"]
    nodes_only = [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": node_labels["app.kubernetes.io/name"]}}}]
    (node_c,) = _pod(node)["containers"]
    node_ports = {p["name"]: p["containerPort"] for p in node_c["ports"]}
    (tracker_c,) = _pod(tracker)["containers"]
    tracker_ports = {p["name"]: p["containerPort"] for p in tracker_c["ports"]}
    want = {
        "p2preg-tracker": (tracker, [
            (nodes_only, {tracker_ports["https"]}),
            ([PROMETHEUS], {tracker_ports["metrics"]}),
        ]),
        "p2preg-node": (node, [
            (nodes_only, {node_ports["bittorrent-tls"]}),
            ([PROMETHEUS], {node_ports["metrics"]}),
        ]),
    }
    policies = {name: o for (kind, name), o in base.items() if kind == "NetworkPolicy"}
    assert set(policies) == set(want)
    for name, (workload, rules) in want.items():
        spec = policies[name]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        selected = spec["podSelector"]["matchLabels"].items()
        assert selected <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert _rules(policies[name]) == rules
    # The facade (loopback) is reachable by no rule at all.
    assert NODE_LISTEN.port not in {p for _, ports in want["p2preg-node"][1] for p in ports}


def test_the_example_overlay_admits_the_machines_network_beside_the_node_pods(
    example: dict[Any, Any],
) -> None:
    for name in ("p2preg-tracker", "p2preg-node"):
        (sources, _), (prometheus, _) = _rules(example["NetworkPolicy", name])
        kinds = [next(iter(s)) for s in sources]
        assert kinds == ["podSelector", "ipBlock"], name
        assert prometheus == [PROMETHEUS]


def test_the_example_overlay_renders_with_kustomize(example: dict[Any, Any]) -> None:
    configmaps = {name for kind, name in example if kind == "ConfigMap"}
    for workload in _workloads(example)[:2]:
        assert workload["metadata"]["namespace"] == "p2preg"
        pod = _pod(workload)
        for c in _containers(workload):
            assert c["image"] == f"registry.example.com/platform/p2preg:{__version__}"
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
    assert not [k for k in example if k[0] == "Secret"]


# -- Kubernetes: the Redis with Sentinel overlay ----------------------------------------------


@pytest.fixture(scope="module")
def sentinel_overlay() -> dict[tuple[str, str], dict[str, Any]]:
    return _render(REDIS_SENTINEL)


def _configmap(objects: dict[tuple[str, str], dict[str, Any]], prefix: str) -> dict[str, str]:
    (cm,) = [o for (kind, name), o in objects.items()
             if kind == "ConfigMap" and name.startswith(prefix)]
    data: dict[str, str] = cm["data"]
    return data


def test_the_sentinel_overlay_runs_a_primary_two_replicas_and_three_sentinels(
    sentinel_overlay: dict[Any, Any],
) -> None:
    redis = sentinel_overlay["StatefulSet", "p2preg-redis"]
    service = sentinel_overlay["Service", "p2preg-redis"]
    spec = redis["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == service["metadata"]["name"]
    # Headless, and publishing unready pods: the sentinels find each other at first start.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    containers = {c["name"]: c for c in _pod(redis)["containers"]}
    assert containers["redis"]["command"] == ["redis-server", "/conf/redis.conf"]
    assert containers["sentinel"]["command"] == ["redis-sentinel", "/conf/sentinel.conf"]
    ports = {p["name"]: p["containerPort"] for c in containers.values() for p in c["ports"]}
    assert ports == {"redis": 6379, "sentinel": 26379}
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert _pod(redis)["securityContext"]["runAsNonRoot"] is True
    assert _pod(redis)["automountServiceAccountToken"] is False
    for c in _containers(redis):
        _locked_down(c["securityContext"], c["name"])
        assert re.fullmatch(r"docker\.io/library/redis:7\.0\.\d+", c["image"]), c["image"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    _spread(redis)
    _budget(sentinel_overlay, redis)
    # The init step writes both configs from the Secret the trackers read too.
    (init,) = _pod(redis)["initContainers"]
    script = _configmap(sentinel_overlay, "p2preg-redis-config")["redis-config.sh"]
    script_mount = _volume_at(redis, init, "/scripts")
    assert script_mount["configMap"]["name"].startswith("p2preg-redis-config")
    assert init["command"] == ["sh", "/scripts/redis-config.sh"]
    assert _volume_at(redis, init, "/run/p2preg/store")["secret"]["secretName"] == "p2preg-store"
    assert "password=$(cat /run/p2preg/store/password)" in script
    assert 'sentinel monitor $service $primary 6379 2"' in script, "a quorum of 2 of 3"
    for line in ("requirepass $password", "masterauth $password",
                 "sentinel auth-pass $service $password"):
        assert f'echo "{line}"' in script, line


def test_the_sentinel_overlay_points_the_trackers_at_every_sentinel(
    sentinel_overlay: dict[Any, Any],
) -> None:
    redis = sentinel_overlay["StatefulSet", "p2preg-redis"]
    script = _configmap(sentinel_overlay, "p2preg-redis-config")["redis-config.sh"]
    (service,) = re.findall(r"^service=(\S+)$", script, re.MULTILINE)
    toml = tomllib.loads(_configmap(sentinel_overlay, "p2preg-tracker-config")["tracker.toml"])
    sentinels = ",".join(
        f"p2preg-redis-{i}.{redis['spec']['serviceName']}:26379"
        for i in range(redis["spec"]["replicas"])
    )
    assert toml["store"] == f"redis+sentinel://{sentinels}/{service}/0"
    _store_wiring(sentinel_overlay, toml)
    # Only the store differs from the base's tracker.toml.
    base_toml = _toml(BASE / "tracker.toml")
    assert {k: v for k, v in toml.items() if k != "store"} == {
        k: v for k, v in base_toml.items() if k != "store"
    }
    _, tracker, _ = _workloads(sentinel_overlay)
    for c in _containers(tracker):
        assert c["image"] == f"registry.example.com/platform/p2preg:{__version__}"


def test_only_the_trackers_and_redis_itself_reach_redis(sentinel_overlay: dict[Any, Any]) -> None:
    redis = sentinel_overlay["StatefulSet", "p2preg-redis"]
    _, tracker, _ = _workloads(sentinel_overlay)
    policy = sentinel_overlay["NetworkPolicy", "p2preg-redis"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    name = "app.kubernetes.io/name"
    sources = [{"podSelector": {"matchLabels": {name: w["spec"]["template"]["metadata"]["labels"][
        name]}}} for w in (tracker, redis)]
    assert _rules(policy) == [(sources, {6379, 26379})]
    # The trackers' own policy limits what reaches them, not where they connect.
    assert sentinel_overlay["NetworkPolicy", "p2preg-tracker"]["spec"]["policyTypes"] == [
        "Ingress"
    ]


# -- systemd and the sample configs ---------------------------------------------------------


def _unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys such as LoadCredential repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, line
        key, sep, value = line.partition("=")
        assert sep, line
        current.append((key, value))
    return sections


def _one(section: list[tuple[str, str]], key: str) -> str:
    (value,) = [v for k, v in section if k == key]
    return value


def test_the_sample_configs_load() -> None:
    node = load(NodeConfig, file=DEPLOY / "config/node.toml", env={})
    assert node.listen == NODE_LISTEN and node.data_dir == NODE_DATA_DIR
    assert node.peer_ssl_port == PEER_TLS_PORT and node.metrics_listen is not None
    assert node.tracker is not None and node.tracker.startswith("https://")
    tracker = load(TrackerConfig, file=DEPLOY / "config/tracker.toml", env={})
    assert tracker.listen.port == TRACKER_LISTEN.port and tracker.data_dir == TRACKER_DATA_DIR
    assert tracker.udp is False and tracker.token is None and tracker.token_file is None


UNITS = [
    ("p2preg-node.service", "node", "node.toml", NODE_DATA_DIR),
    ("p2preg-tracker.service", "tracker", "tracker.toml", TRACKER_DATA_DIR),
]


@pytest.mark.parametrize(("unit", "command", "sample", "data_dir"), UNITS)
def test_the_systemd_units_run_the_installed_command_with_the_sample_config(
    unit: str, command: str, sample: str, data_dir: Path, ca: ClusterCA, tmp_path: Path
) -> None:
    """ExecStart, with $CREDENTIALS_DIRECTORY holding real files of the unit's role."""
    parsed = _unit(unit)
    service = parsed["Service"]
    assert _one(parsed["Unit"], "Description")
    assert _one(parsed["Install"], "WantedBy") == "multi-user.target"
    argv = shlex.split(_one(service, "ExecStart"))
    assert argv[0] == str(ENTRYPOINT) and argv[1] == command
    assert Path("/var/lib") / _one(service, "StateDirectory") == data_dir
    assert _one(service, "KillSignal") == "SIGTERM"
    creds = _tls_dir(ca, tmp_path, command, "m1")
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", str(creds)) for a in argv[1:]]
    args = build_parser(command).parse_args(_config_path(argv, DEPLOY / "config" / sample))
    if command == "node":
        config: NodeConfig | TrackerConfig = node_cli.config_from_args(args)
        assert isinstance(config, NodeConfig)
        assert float(_one(service, "TimeoutStopSec")) > config.shutdown_grace_s + 5
        pre = shlex.split(_one(service, "ExecStartPre").lstrip("+"))
        assert pre[0] == str(ENTRYPOINT) and pre[1] == "containerd-config"
        assert build_parser("containerd-config").parse_args(pre[1:]).config == Path(
            "/etc/p2preg/node.toml"
        )
    else:
        config = tracker_cli.config_from_args(args)
        assert isinstance(config, TrackerConfig)
        assert config.token is None and config.udp is False
    assert config.tls_dir == creds and config.insecure is False


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "UMask": "0077",
    "StateDirectoryMode": "0700",
}


@pytest.mark.parametrize(("unit", "command", "sample", "data_dir"), UNITS)
def test_the_systemd_units_are_sandboxed_and_hold_no_secret(
    unit: str, command: str, sample: str, data_dir: Path
) -> None:
    service = _unit(unit)["Service"]
    keys = dict(service)
    for key, value in HARDENING.items():
        assert _one(service, key) == value, key
    assert keys["User"] == keys["Group"] == "p2preg" and "DynamicUser" not in keys
    # Writable: the state directory, nothing else.
    assert _one(service, "ReadWritePaths") == str(data_dir)
    # The certificate: root's 0600 files, a private copy for the service.
    creds = [v for k, v in service if k == "LoadCredential"]
    assert sorted(creds) == sorted(
        f"{f}:/etc/p2preg/tls/{f}" for f in ("tls.crt", "tls.key", "ca.crt")
    )
    assert "--tls-dir ${CREDENTIALS_DIRECTORY}" in _one(service, "ExecStart")
    # No secret in the environment, no plain text on the network.
    assert not {"Environment", "EnvironmentFile"} & set(keys)
    assert not re.search(r"--insecure|--token|TOKEN", "\n".join(v for _, v in service))


@pytest.mark.parametrize("unit", [u for u, *_ in UNITS])
def test_systemd_accepts_every_key_of_the_units(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` reports any key or value it would ignore."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # no systemd here: every key at least has a value shape we know
        for key, value in _unit(unit)["Service"]:
            assert re.fullmatch(r"[A-Z][A-Za-z]+", key) and "\n" not in value
        return
    # verify wants ExecStart's program to exist; the unit is otherwise as shipped.
    text = (DEPLOY / "systemd" / unit).read_text().replace(str(ENTRYPOINT), "/bin/true")
    (tmp_path / unit).write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done


# -- compose ---------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    (compose,) = _yaml_docs(DEPLOY / "compose" / "compose.yaml")
    return compose


def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """volume name → (path in the container, read-only)."""
    out = {}
    for v in svc.get("volumes", []):
        name, path, *mode = str(v).split(":")
        out[name] = (path, mode == ["ro"])
    return out


def test_the_compose_cluster_is_built_from_the_image_and_wired_to_itself(
    ca: ClusterCA, tmp_path: Path
) -> None:
    path = DEPLOY / "compose" / "compose.yaml"
    compose = _compose()
    services = compose["services"]
    nodes = [s for s in services if s.startswith("node")]
    assert len(nodes) >= 3 and {"tracker", "seed", "ca"} <= set(services)
    seed_port = int(services["seed"]["ports"][0].rsplit(":", 1)[1])
    host_ports = set()
    for name in ["ca", "tracker", *nodes]:
        svc = services[name]
        assert svc["image"] == f"{IMAGE_NAME}:{__version__}"
        build = svc["build"]
        assert (path.parent / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]
        assert "environment" not in svc, "no secret in any environment"
        if name == "ca":
            continue
        assert "user" not in svc and "cap_add" not in svc, "the image's user, no capability"
        assert "--insecure" not in svc["command"]
        # Its own certificate volume, read-only, where --tls-dir points; and no other.
        tls_volumes = [v for v in _mounts(svc) if v.startswith("tls-")]
        assert tls_volumes == [f"tls-{name}"]
        assert _mounts(svc)[f"tls-{name}"] == (_arg(svc["command"], "--tls-dir"), True)
        assert svc["depends_on"]["ca"]["condition"] == "service_completed_successfully"
    tracker = services["tracker"]
    targv = _replace_arg(
        tracker["command"], "--tls-dir", str(_tls_dir(ca, tmp_path, "tracker", "tracker"))
    )
    tconfig = tracker_cli.config_from_args(build_parser("tracker").parse_args(targv))
    assert tconfig.listen.port == TRACKER_LISTEN.port and tconfig.data_dir == TRACKER_DATA_DIR
    assert _mounts(tracker)["tracker-data"] == (str(TRACKER_DATA_DIR), False)
    for name in nodes:
        svc = services[name]
        argv = _replace_arg(svc["command"], "--tls-dir", str(_tls_dir(ca, tmp_path, "node", name)))
        config = node_cli.config_from_args(build_parser("node").parse_args(argv))
        (published,) = svc["ports"]
        bind, host_port, container_port = published.split(":")
        assert bind == "127.0.0.1" and int(container_port) == config.listen.port
        host_ports.add(int(host_port))
        assert config.tracker == f"https://tracker:{tconfig.listen.port}"
        assert config.upstream[0].url == f"http://seed:{seed_port}"
        assert config.data_dir == NODE_DATA_DIR
        assert _mounts(svc)[f"{name}-data"] == (str(NODE_DATA_DIR), False)
        assert svc["depends_on"]["tracker"]["condition"] == "service_healthy"
    assert len(host_ports) == len(nodes)
    # The CA's key: in one volume, which only the one-shot ca service mounts.
    assert [s for s in services if "ca-key" in _mounts(services[s])] == ["ca"]
    for volume in compose["volumes"]:
        assert any(volume in _mounts(s) for s in services.values()), volume


def _run_ca_step(script: str, root: Path, tops: set[str]) -> None:
    """The ca service's script with its volumes under `root`, handing files to this user.

    Every path under a mount's top directory (`/pki`, `/tls`) moves under `root`,
    loop variables included; anything else the script touched would fail.
    """
    for top in tops:
        script = re.sub(rf"(?<![\w/.-]){re.escape(top)}(?=[/\s\"]|$)", f"{root}{top}", script)
    script = script.replace("$$", "$").replace(f"{UID}:{UID}", f"{os.getuid()}:{os.getgid()}")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    subprocess.run(["/bin/sh", "-ec", script], env=env, check=True, timeout=120,
                   capture_output=True)


def test_the_compose_ca_step_issues_each_member_its_own_certificate(tmp_path: Path) -> None:
    """Runs the one-shot ca service's own script, twice (a second `up` renews)."""
    services = _compose()["services"]
    ca_svc = services["ca"]
    assert ca_svc["restart"] == "no" and ca_svc["user"] == "0:0"
    assert set(ca_svc["cap_add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
    assert ca_svc["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = ca_svc["command"]
    assert f"chown -R {UID}:{UID}" in script
    root = tmp_path / "root"
    dirs = {}
    for volume, (inside, _) in _mounts(ca_svc).items():
        dirs[volume] = root / inside.lstrip("/")
        dirs[volume].mkdir(mode=0o755, parents=True)  # as a fresh Docker volume starts
    tops = {"/" + Path(inside).parts[1] for inside, _ in _mounts(ca_svc).values()}
    _run_ca_step(script, root, tops)
    ca_pem = (dirs["ca-key"] / "ca.crt").read_bytes()
    _run_ca_step(script, root, tops)
    assert (dirs["ca-key"] / "ca.crt").read_bytes() == ca_pem, "the CA is made once"
    members = {n: s for n, s in services.items() if f"tls-{n}" in _mounts(s)}
    assert set(members) == {"tracker", "node1", "node2", "node3"}
    for name, svc in members.items():
        tls_dir = dirs[f"tls-{name}"]
        role = "tracker" if name == "tracker" else "node"
        material = load_tls_dir(tls_dir, role=role)
        assert (material.identity.cluster, material.identity.name) == ("compose", name)
        assert sorted(p.name for p in tls_dir.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
        assert (tls_dir.stat().st_mode & 0o777) == 0o700
        assert ((tls_dir / "tls.key").stat().st_mode & 0o777) == 0o600
        argv = _replace_arg(svc["command"], "--tls-dir", str(tls_dir))
        cli = node_cli if role == "node" else tracker_cli
        config = cli.config_from_args(build_parser(role).parse_args(argv))
        assert config.tls_dir == tls_dir
    # The nodes check the tracker's name: its certificate carries the service's.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((dirs["tls-tracker"] / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "tracker" in sans.get_values_for_type(x509.DNSName)
