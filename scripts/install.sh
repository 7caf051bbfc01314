#!/usr/bin/env bash
# Installs everything p2preg, its tests, its demo and its benchmarks need on a fresh
# Debian 12 machine: the apt packages of the real components the tests start, and a
# virtualenv in .venv with the project installed in editable mode.
# Idempotent: a second run only checks. Extra apt packages may be named as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(docker-registry containerd skopeo podman iproute2 redis-server redis-sentinel "$@")
# nginx: the benchmarks' reference server; tests/test_harness.py starts it in a namespace.
apt_packages+=(nginx)
missing=()
# chromium: tests/test_cluster_page.py loads the tracker's cluster page in it, headless.
apt_packages+=(chromium)
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The deploy tests render the Kubernetes overlay with `kubectl kustomize`;
# any kubectl will do, Debian's comes in kubernetes-client.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
# tests/test_dashboard.py runs every Grafana panel's query against Debian's Prometheus.
[[ -x /usr/bin/prometheus ]] || missing+=(prometheus)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install.sh: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    # Packaged daemons (docker-registry, nginx, opentracker) must not start on their
    # default ports: tests and benchmarks start their own instances on free ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# Debian's redis-server and redis-sentinel services take 6379 and 26379 where an init
# system runs them; the tests start their own on free ports, so the packaged ones stay
# stopped and disabled (a no-op where they never started).
for unit in redis-server redis-sentinel; do
    if [[ -d /run/systemd/system ]] && { systemctl is-enabled --quiet "$unit" 2>/dev/null ||
        systemctl is-active --quiet "$unit"; }; then
        systemctl disable --now --quiet "$unit"
    fi
done

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || constraints.txt -nt $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
    touch "$stamp"
fi
