#!/usr/bin/env bash
# Set up .venv with lmfoundry installed in editable mode. Idempotent: a second run only
# checks. `--test` adds the test extras (pytest, transformers as the parity reference, gguf,
# playwright) and Debian's chromium when missing and run as root;
# `--plots` adds matplotlib (the quickstart's report plots).
# Torch: if the environment has none, install it explicitly first so the project's own
# range (torch>=2.4) never drags in an unintended build. LMFOUNDRY_TORCH overrides the
# spec (default torch==2.13.0: on this project's machines a CPU wheel that lies on disk;
# elsewhere pip picks the platform's build of that release).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test,serve]"
[ "${1:-}" = "--plots" ] && extras="[plots]"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${LMFOUNDRY_TORCH:-torch==2.13.0}" >&2
  .venv/bin/python -m pip install -q "${LMFOUNDRY_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".${extras}"
# The chat page's browser test drives Debian's Chromium; install it when missing and we may (root),
# and carry on without it (that test then skips with the reason).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium for the chat page test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: could not install chromium; tests/test_chat_page.py will be skipped" >&2
fi
