#!/usr/bin/env bash
# generation.compile_layers off / on, and the decode-attention candidates, side by side in one GPU call
# (one H100 / H200, under 10 minutes). Each run is its own process (compiled code is per process, the inductor
# cache on disk is shared: the first --compile-layers run is the cold compile) and has its own time limit, so a
# run that overruns loses only itself; a run that would end past BUDGET seconds (default 570) is skipped.
# Writes OUT_DIR/<run>.json for each run and OUT_DIR/logs.tar.gz with every run's log (8 files in all):
#
#   bash bench/compile_layers_ab.sh "$OUT"
set -u
out=${1:?usage: bench/compile_layers_ab.sh OUT_DIR}
budget=${BUDGET:-570}
pattern="replay|sampling|generate 8|engine:|step [0-9]|skipped|Error"
source "$(dirname "$0")/steps.sh"

run() {  # run NAME LIMIT_S SCRIPT ARGS...: step running SCRIPT with --out OUT_DIR/NAME.json
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$py" "$@" --out "$out/$name.json"
}

run profile_eager 75 profile_decode.py --iters 30
run profile_compiled 140 profile_decode.py --iters 30 --compile-layers
run attention_kernels 80 attention_kernels.py
run grpo_mixed_compiled 90 grpo.py --impl ours --mixed --steps 6 --compile-layers
run grpo_mixed_eager 65 grpo.py --impl ours --mixed --steps 6
run stage_a_mixed_compiled 60 stage_a.py --mixed --images 384 --call-size 128 --baseline-batches --compile-layers
run stage_a_mixed_eager 50 stage_a.py --mixed --images 384 --call-size 128 --baseline-batches
pack_logs logs.tar.gz
