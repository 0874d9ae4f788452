#!/usr/bin/env bash
# Set everything up and run lmfoundry's main job on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --plots
exec .venv/bin/lmfoundry quickstart "$@"
