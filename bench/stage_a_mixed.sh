#!/usr/bin/env bash
# Stage-A on field-shaped photos, in one GPU call (one H100 / H200, ~8 minutes): where a prefill's time goes
# (bench/profile_prefill.py), the engine against HF generate (bench/stage_a.py --mixed, both in one process), the
# engine with its decode layers compiled, then the issue's entry-point command on a 1,000-photo tree
# (bench/mixed_tree.py), start-up included. Each run is its own process with its own time limit;
# a run that would end past BUDGET seconds (default 900: two device calls, started detached) is skipped; RUNS picks
# runs by the last part of their names (default all: "prefill mixed alone chunked overlap priority switch both
# nocudnn point compiled"; alone runs bench/stage_a.py and the entry point with each batch generated alone (data.lookahead=false),
# nocudnn with model.cudnn_attention=false, chunked with generation.prefill_chunk_tokens=2048, overlap with
# generation.overlap_prefill=true, priority with generation.overlap_decode_priority=true as well, switch with
# generation.overlap_switch_interval=0.0005 instead, both with the two). Writes
# OUT_DIR/<run>.json, the entry
# point's metrics.json and log, and OUT_DIR/logs.tar.gz:
#
#   bash bench/stage_a_mixed.sh "$OUT"
#   RUNS="mixed alone point" bash bench/stage_a_mixed.sh "$OUT"
set -u
out=${1:?usage: bench/stage_a_mixed.sh OUT_DIR}
budget=${BUDGET:-900}
tree=${TREE:-/tmp/mixed_tree}
runs=${RUNS:+ $RUNS }
pattern="images_per_s|hf generate|Stage-A engine|stage_a/|chunks of|Error|error:"
source "$(dirname "$0")/steps.sh"

[ -d "$tree" ] || (runs="" && step mixed_tree 120 "$py" mixed_tree.py --out "$tree" --photos 1000)
step profile_prefill 120 "$py" profile_prefill.py --out "$out/profile_prefill.json"
step stage_a_mixed 200 "$py" stage_a.py --mixed --images 1000 --baseline-images 48 --baseline-batches 16 \
    --out "$out/stage_a_mixed.json"
step stage_a_mixed_alone 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --no-lookahead \
    --out "$out/stage_a_mixed_alone.json"
step stage_a_mixed_chunked 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --prefill-chunk-tokens 2048 \
    --out "$out/stage_a_mixed_chunked.json"
step stage_a_mixed_overlap 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --overlap-prefill \
    --out "$out/stage_a_mixed_overlap.json"
step stage_a_mixed_priority 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --overlap-prefill \
    --overlap-decode-priority --out "$out/stage_a_mixed_priority.json"
step stage_a_mixed_switch 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --overlap-prefill \
    --overlap-switch-interval 0.0005 --out "$out/stage_a_mixed_switch.json"
step stage_a_mixed_both 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --overlap-prefill \
    --overlap-decode-priority --overlap-switch-interval 0.0005 --out "$out/stage_a_mixed_both.json"
step stage_a_mixed_nocudnn 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --no-cudnn-attention \
    --out "$out/stage_a_mixed_nocudnn.json"
# the issue's command, nothing added: the Stage-A defaults must be right on a GPU
entry() {
  local name=$1
  shift
  local start=$SECONDS
  step "$name" 300 "$py" -m bbuqc_lightning.train +experiment=stage_a model=qwen3_vl_4b model.random_init=true \
      trainer=gpu data.root="$tree" paths.output_dir="$out/$name" "$@" || return 0
  echo "$name wall: $((SECONDS - start)) s"
  cp "$out/$name/metrics.json" "$out/${name}_metrics.json" 2>/dev/null
  rm -rf "${out:?}/$name"
}
entry entry_point
entry entry_point_alone data.lookahead=false
entry entry_point_chunked generation.prefill_chunk_tokens=2048
entry entry_point_overlap generation.overlap_prefill=true
entry entry_point_priority generation.overlap_prefill=true generation.overlap_decode_priority=true
entry entry_point_switch generation.overlap_prefill=true generation.overlap_switch_interval=0.0005
entry entry_point_both generation.overlap_prefill=true generation.overlap_decode_priority=true \
    generation.overlap_switch_interval=0.0005
entry entry_point_nocudnn +model.cudnn_attention=false
step stage_a_mixed_compiled 150 "$py" stage_a.py --mixed --images 1000 --baseline-batches --compile-layers \
    --out "$out/stage_a_mixed_compiled.json"
pack_logs logs.tar.gz
