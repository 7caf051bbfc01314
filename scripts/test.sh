#!/usr/bin/env bash
# The test command: installs what is missing, then lint, types and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k range -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
mypy
lint-imports
exec pytest -q -ra "$@"
