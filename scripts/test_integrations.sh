#!/usr/bin/env bash
# Second environment for the model-zoo integrations (torchvision, timm, segmentation_models_pytorch),
# which cannot share the main .venv: PyPI's torchvision does not import beside the CPU-only torch build
# ("operator torchvision::nms does not exist"). Creates .venv-integrations (idempotent; ignored by git)
# and runs tests/integrations_zoo/ in it. Times and size are printed for the CI log.
#   bash scripts/test_integrations.sh            # set up if needed, then run the tests
#   SETUP_ONLY=1 bash scripts/test_integrations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-integrations
t0=$(date +%s)
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -m pip install -q -c constraints-integrations.txt \
        torch torchvision timm segmentation-models-pytorch 'numpy>=1.23' 'pytest>=7' \
        2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import torch, torchvision, timm, segmentation_models_pytorch as smp; \
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, smp {smp.__version__}')"
    touch "$VENV/.complete"
    echo "integrations env: created in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)"
fi
[ -n "${SETUP_ONLY:-}" ] && exit 0
# pixreg itself is imported from this checkout (no install: nothing else in the env changes).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir "$PWD" -o addopts="-ra" tests/integrations_zoo "$@"
