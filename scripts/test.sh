#!/usr/bin/env bash
# Installs deepsail with its test extras into ./.venv (CPU torch pinned) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec .venv/bin/python -m pytest "$@"
