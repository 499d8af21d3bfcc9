#!/usr/bin/env bash
# Set up, then compare every regularizer with cross-entropy on the embedded dataset (2 seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pixreg compare --config scenes --methods ce,cplus1,car,lall,rch --seeds 2 --out runs/quickstart "$@"
