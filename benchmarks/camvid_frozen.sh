#!/usr/bin/env bash
# CamVid verdicts on the frozen-encoder protocol (issue 14): `pixreg compare` of CE and each
# regularizer over 8 paired seeds, then CE vs the best pair, on the built-in configuration
# camvid_frozen (ImageNet-pretrained EfficientNet-Lite0 frozen, its stride-8/16/32 features of
# 6 fixed views per training image cached once; FPN decoder width 64 + classifier trained 4800
# steps of 8 with AdamW lr 0.002 + poly; 90x120; final model on the full val and test splits;
# the library's default settings of every regularizer).
# Writes benchmarks/results/camvid_frozen.{md,json} (and camvid_frozen_pair.*) with the command,
# machine and date.
#
#   bash benchmarks/camvid_frozen.sh /path/to/CamVid [PAIR] [extra pixreg compare options]
#
# PAIR (default cplus1+lall: the two best single methods on val at 4800 steps) is the combination
# compared with CE in the second table. Runs go to runs/protocols/frozen_$STEPS (shared with
# benchmarks/protocols.py); interrupted runs resume, finished ones are read. JOBS (default 2)
# runs at once, one thread each. STEPS (default 4800) is the schedule. REPORT_ONLY=1 trains
# nothing and tabulates the seeds finished for every method. C+1: Sky (class 0) plays the
# background class.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-${PIXREG_CAMVID:?usage: bash benchmarks/camvid_frozen.sh /path/to/CamVid [pair] [options] (or set PIXREG_CAMVID)}}
PAIR=${2:-cplus1+lall}
shift $(( $# > 2 ? 2 : $# )) || true
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-8}
STEPS=${STEPS:-4800}
PY=${PYTHON:-.venv/bin/python}
OUT=runs/protocols/frozen_$STEPS
SUFFIX=$([ "$STEPS" = 4800 ] && echo "" || echo "_$STEPS")
EXTRA=(--set data.cache_dir=runs/cache --set "train.steps=$STEPS" --no-progress)
[ "${REPORT_ONLY:-0}" = 1 ] && EXTRA+=(--report-only)
for METHODS in ce,cplus1,car,lall,rch "ce,$PAIR"; do
  NAME=camvid_frozen$SUFFIX
  [ "$METHODS" = ce,cplus1,car,lall,rch ] || NAME=camvid_frozen_pair$SUFFIX
  if [ "${REPORT_ONLY:-0}" = 1 ] && [ "$NAME" != "camvid_frozen$SUFFIX" ] && [ ! -d "$OUT/${PAIR//+/_}" ]; then
    echo "no runs of $PAIR yet: no pair table"; continue
  fi
  ARGS=(compare --config camvid_frozen --data-root "$ROOT" --methods "$METHODS" --seeds "$SEEDS" --out "$OUT"
        --jobs "$JOBS" --threads "$JOBS" "${EXTRA[@]}" "$@")
  $PY -m pixreg "${ARGS[@]}"
  $PY benchmarks/publish_compare.py "$OUT" "$NAME" "${ARGS[*]}"
done
