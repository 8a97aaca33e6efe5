#!/usr/bin/env bash
# Mixed-shape GRPO in one GPU call (one H100 / H200): ours for 8 steps with each step's phases timed, the same
# without cuDNN attention (nocudnn: model.cudnn_attention=false), with overlapped prefill (overlap:
# generation.overlap_prefill=true; priority: with generation.overlap_decode_priority=true as well; switch: with
# generation.overlap_switch_interval=0.0005 instead; both: with the two; none in the default runs), ours again for
# 2 steps with the first one under torch.profiler (what a first step spends that later ones do not), then TRL 1.16
# on the same prompts (gradient accumulation over micro-batches of 16 completions; all 64 at once runs out of
# memory). Each run is its own process with its own time limit; a run that would end past BUDGET seconds (default
# 750) is skipped; RUNS (default "ours nocudnn profile trl") picks the runs. Writes OUT_DIR/<run>.json and
# OUT_DIR/logs_<runs>.tar.gz:
#
#   bash bench/grpo_mixed.sh "$OUT"
#   RUNS=trl BUDGET=400 bash bench/grpo_mixed.sh "$OUT"   # the baseline alone, later in the same hold
set -u
out=${1:?usage: bench/grpo_mixed.sh OUT_DIR}
budget=${BUDGET:-750}
steps=${STEPS:-8}
runs=" ${RUNS:-ours nocudnn profile trl} "
pattern="step [0-9]+:|completions_per_s|Error|error:"
source "$(dirname "$0")/steps.sh"

step grpo_mixed_ours 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --out "$out/grpo_mixed_ours.json"
step grpo_mixed_ours_nocudnn 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --no-cudnn-attention \
    --out "$out/grpo_mixed_ours_nocudnn.json"
step grpo_mixed_ours_overlap 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --overlap-prefill \
    --out "$out/grpo_mixed_ours_overlap.json"
step grpo_mixed_ours_priority 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --overlap-prefill \
    --overlap-decode-priority --out "$out/grpo_mixed_ours_priority.json"
step grpo_mixed_ours_switch 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --overlap-prefill \
    --overlap-switch-interval 0.0005 --out "$out/grpo_mixed_ours_switch.json"
step grpo_mixed_ours_both 150 "$py" grpo.py --impl ours --mixed --steps "$steps" --overlap-prefill \
    --overlap-decode-priority --overlap-switch-interval 0.0005 --out "$out/grpo_mixed_ours_both.json"
step grpo_mixed_ours_profile 100 "$py" grpo.py --impl ours --mixed --steps 2 --profile-step 1 \
    --out "$out/grpo_mixed_ours_profile.json"
step grpo_mixed_trl 360 "$py" grpo.py --impl trl --mixed --steps "$steps" --trl-micro-batch 16 \
    --out "$out/grpo_mixed_trl.json"
tag=${RUNS:-all}
pack_logs "logs_${tag// /_}.tar.gz"
