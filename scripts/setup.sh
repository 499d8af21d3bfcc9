#!/usr/bin/env bash
# Create .venv (if missing) and install pixreg with every extra, torch at the version of constraints.txt
# (the CPU build where pip finds a CPU wheel first; see README, "Which torch build").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet() { grep -v '^WARNING: Location' || true; }
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all]' 2>&1 | quiet
# animal-mnist declares tensorflow as a dependency but pixreg only reads its gzip files: skip its deps.
.venv/bin/python -m pip install -q -c constraints.txt --no-deps 'animal-mnist>=0.4' 2>&1 | quiet
.venv/bin/python -c "import pixreg, torch; print(f'pixreg {pixreg.__version__}, torch {torch.__version__}')"
