#!/usr/bin/env bash
# Creates ./.venv and installs deepsail into it. `bash scripts/install.sh test` adds the test extras.
# torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# TextAugmenter's synonyms come from WordNet 3.0 in Debian's wordnet-base (read offline: nothing is downloaded at run
# time), installed here when missing and we may (root, or passwordless sudo); elsewhere the synonym methods say so.
s=""; [ "$(id -u)" = 0 ] || s="sudo -n"
if [ ! -e /usr/share/wordnet/index.noun ] && command -v apt-get >/dev/null && $s true 2>/dev/null; then
  { $s apt-get update -qq && $s env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    wordnet-base >/dev/null; } || echo "install.sh: could not install wordnet-base (TextAugmenter's synonyms)" >&2
fi
# The chat page's test (tests/test_chat_page.py) drives a real headless browser: Debian's chromium, through
# playwright's Python package (its own `playwright install` download is never used). Only for `install.sh test`.
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && $s true 2>/dev/null; then
  { $s apt-get update -qq && $s env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium >/dev/null; } || echo "install.sh: could not install chromium (the chat page's browser test)" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
extra=""; [ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}"
