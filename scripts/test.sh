#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU: the main suite in .venv, then the
# smp/timm/torchvision model tests in their own environment (scripts/test_integrations.sh).
# Arguments go to the main suite's pytest; PIXREG_SKIP_ZOO=1 skips the second environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ -z "${PIXREG_SKIP_ZOO:-}" ]; then
    bash scripts/test_integrations.sh
fi
