#!/usr/bin/env bash
# CamVid benchmark for issue 3: `pixreg compare` of CE and each regularizer (+ a combination)
# over 3 seeds at reduced resolution, on CPU. Writes benchmarks/results/camvid_compare.{md,json}
# with the command, machine and date.
#
#   bash benchmarks/camvid_compare.sh [CAMVID_ROOT] [METHODS] [extra pixreg args...]
#
# Protocol (chosen to fit a 2-core CPU machine; see README "Results on CamVid"):
# 90x120 images (a quarter of 360x480 per side), FCN on a ResNet-10 trunk (width 16) at
# output stride 8, STEPS steps of batch 8 with AdamW + poly, evaluated on the full val and
# test splits with the final model. STEPS defaults to 1600, the protocol the study in
# benchmarks/protocols.py picked (least CPU time per detectable point); the committed
# table (benchmarks/results/camvid_compare.md) was made with STEPS=800:
#   STEPS=800 bash benchmarks/camvid_compare.sh /path/to/CamVid ce,cplus1,car,lall,rch,cplus1+lall --threads 1
# C+1 needs a background class, which CamVid lacks: Sky (class 0) plays that role here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-${PIXREG_CAMVID:?usage: bash benchmarks/camvid_compare.sh /path/to/CamVid [methods] [pixreg compare options] (SegNet layout; or set PIXREG_CAMVID)}}
METHODS=${2:-ce,cplus1,car,lall,rch}
shift $(( $# > 2 ? 2 : $# )) || true
STEPS=${STEPS:-1600}
OUT=runs/camvid_compare
[ "$STEPS" = 800 ] || OUT=runs/camvid_compare_$STEPS
ARGS=(compare --config camvid --data-root "$ROOT" --methods "$METHODS" --seeds 3 --out "$OUT"
      --set "data.size=[90, 120]" --set "model.opts={width: 16, depth: 10, head_channels: 64}"
      --set train.steps=$STEPS --set train.eval_every=0 --set train.warmup_steps=50
      --set methods.cplus1.background_index=0 --no-progress "$@")
.venv/bin/pixreg "${ARGS[@]}"
.venv/bin/python benchmarks/publish_compare.py "$OUT" camvid_compare "${ARGS[*]}"
