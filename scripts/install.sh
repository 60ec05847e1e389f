#!/usr/bin/env bash
# Creates ./.venv and installs deepsail into it. `bash scripts/install.sh test` adds the test extras.
# torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
extra=""; [ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}"
