#!/usr/bin/env bash
# Installs deepsail with its test extras into ./.venv (CPU torch pinned), checks formatting and lint (ruff, configured
# in pyproject.toml), and runs the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
.venv/bin/ruff format --check --quiet . || { echo "ruff format: run '.venv/bin/ruff format .'"; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
