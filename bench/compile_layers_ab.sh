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
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")" || exit 1
export PYTHONPATH=..${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
budget=${BUDGET:-570}

step() {  # step NAME LIMIT_S SCRIPT ARGS...: run SCRIPT with --out OUT_DIR/NAME.json
  local name=$1 limit=$2
  shift 2
  if ((SECONDS + limit > budget)); then
    echo "== $name skipped: ${SECONDS}s used of ${budget}s"
    return
  fi
  local start=$SECONDS
  timeout "$limit" "$py" "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - start))s"
  grep -E "replay|sampling|generate 8|engine:|step [0-9]|skipped|Error" "$out/$name.log" | tail -n 12
}

"$py" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
step profile_eager 75 profile_decode.py --iters 30
step profile_compiled 140 profile_decode.py --iters 30 --compile-layers
step attention_kernels 80 attention_kernels.py
step grpo_mixed_compiled 90 grpo.py --impl ours --mixed --steps 6 --compile-layers
step grpo_mixed_eager 65 grpo.py --impl ours --mixed --steps 6
step stage_a_mixed_compiled 60 stage_a.py --mixed --images 384 --call-size 128 --baseline-batches --compile-layers
step stage_a_mixed_eager 50 stage_a.py --mixed --images 384 --call-size 128 --baseline-batches
tar czf "$out/logs.tar.gz" -C "$out" --remove-files $(cd "$out" && ls ./*.log)
