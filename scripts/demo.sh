#!/usr/bin/env bash
# The demo: installs what is missing, then pulls a generated image through p2preg
# nodes with real containerd (see scripts/demo.py --help for its options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python scripts/demo.py "$@"
