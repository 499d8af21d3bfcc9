#!/usr/bin/env bash
# The whole CUDA benchmark grid in one command (issue 20), writing benchmarks/results/:
#   1. eager: loss alone (forward + backward) at K = 21, 150, 171 and 256, 512 px, batch 8,
#      LALL through the fused Triton kernels (`lall`) and through PyTorch (`lall_torch`);
#      whole training steps at 512x512, batch 8, K = 21, 171 on the three reference networks
#      (fcn18, deeplabv3plus_r50, segformer_b2; benchmarks/reference_models.py)
#      -> losses_cuda_grid.{md,json}
#   2. compiled (torch.compile, inductor): loss alone at K = 21, 171, 512 px
#      -> losses_cuda_grid_inductor.{md,json}
#   3. graph-break report (fullgraph=True, inductor) -> losses_cuda_grid_compile.{md,json}
# Each part is capped (PART1_S, PART2_S, PART3_S seconds; 240 + 150 + 60 by default) so that
# the whole grid stays under 8 minutes. Budget estimated from the H100 eager results of
# losses_cuda.md; this script has NOT been run on a GPU yet (none was available when it was
# written): check the caps on the first run.
# Usage: bash benchmarks/cuda_grid.sh            (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
bench() {
    local cap=$1
    shift
    timeout "$cap" "$PY" benchmarks/bench_losses.py --device cuda "$@"
}
bench "${PART1_S:-240}" --classes 21,150,171 --sizes 256,512 --batch 8 --repeats 10 --warmup 2 \
    --naive-classes "" --references fcn18,deeplabv3plus_r50,segformer_b2 \
    --step-classes 21,171 --step-sizes 512 --step-repeats 5 --out "$OUT/losses_cuda_grid"
bench "${PART2_S:-150}" --compile --compile-backend inductor --classes 21,171 --sizes 512 --batch 8 \
    --repeats 10 --warmup 2 --naive-classes "" --step-classes "" --no-memory \
    --out "$OUT/losses_cuda_grid_inductor"
bench "${PART3_S:-60}" --compile-check --compile-backend inductor --out "$OUT/losses_cuda_grid"
