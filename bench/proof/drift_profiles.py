"""Per-device settings of the drift/cure pipeline (``bench/drift_and_cure.py --set KEY=VALUE`` overrides one).

cuda: the ``small`` preset (105 M parameters, random init, real Qwen3 tokenizer); the base is the learning proof's
fusion SFT (1,000 steps of 64 rows since run 5, its vision tower trained; 650 before). These are run 5's settings
(docs/RESULTS.md: one H100, 2026-12-07, 22.8 minutes with 4 processes, every run to its step count) but for the
base's mix, which after run 5 gives summaries more of each batch and draws those that name a finding 4x (run 6, one
H200: 19 of the 23 steps in 19.1 minutes), the base's verdicts that name 弯曲半径不合理 drawn 4x (after run 6), and the
penalty arm's learning rate (2e-4, run 5: 3e-4); run 7 (one H100, 21 of the 23 steps over three calls) ran these.
After run 7 the base draws the summaries that name 弯曲半径不合理 or 未拧紧 16x (not run yet). Training-time
caps (``*_max_minutes``) are safety nets above what each run took with 4 processes sharing the GPU, so the step
counts, not the clock, end the runs; a step that hits its cap says so in its log. cpu: a smoke run of the ``tiny``
preset that only shows every step runs and feeds the next (its numbers mean nothing).
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "model": "small",
        "teacher_model": "small",
        "train": 1000,
        "val": 25,
        "test": 50,  # per mission: 200 held-out tickets, 100 of them fail (cut from 100 to fit the calls)
        "sft_batch": 64,
        "sft_workers": 4,  # up to 4 SFT processes at once share 16 CPU cores
        "stage_b_ratio": 6.0,  # the Teacher's (Stage-B rows per epoch = 6 x tickets)
        # after run 5 (Stage-A kept too few findings, its summary loss still falling): more of each base batch is
        # summaries (ratio 3: 48 % of the rows; run 5's 6: 33 %), and the summaries that name a finding that fails
        # a ticket (17 % of the photos, each finding 0.4-4 %) are drawn 4x as often, through answer_oversample in
        # <out>/fusion/base_findings.yaml: 45 % of the summary rows (1.0: the embedded mix as is, as in runs 1-5)
        "base_stage_b_ratio": 3.0,
        "base_finding_oversample": 4.0,
        # after run 6 (Stage-B passed the 弯曲半径不合理 tickets even from reference summaries): the base's verdicts whose
        # reason names it (53 of 4,000 train tickets, with the 无保护措施 ones that share the reason) drawn 4x as often
        "base_verdict_oversample": 4.0,
        # after run 7 (the own summaries named 弯曲半径不合理 on none of its 6 held-out photos, in every run, and lost
        # 未拧紧 on 6 of 16; together 5-6 of each seed's ~10 fail tickets under the end-to-end floor): the summaries
        # that name either drawn 16x (the other findings' 4x, times 4): 10.5 % of the summary draws, not 2.8 %
        # (0: no rule of its own; proof/drift_data.RARE_FINDING_PATTERN)
        "base_rare_finding_oversample": 16.0,
        # after run 8 (at 16x the base named 弯曲半径不合理 on the 3 held-out photos that show it, on both seeds, and on
        # 47 that do not: 24 of the seeds' 34 end-to-end false fails): that finding's own rule, ahead of the one
        # above (which then draws 未拧紧 alone, kept on 11 of 16 with 2 unfounded): 8x (0: no rule of its own;
        # proof/drift_data.BEND_FINDING_PATTERN)
        "base_bend_finding_oversample": 8.0,
        # after run 8 (the drift's summary rows, drawn as the embedded mix draws them, undid the base's: 弯曲半径不合理
        # named on 2 of 6 photos after it, 0 of 3 after cure A; the end-to-end floor rose from 6-8 to 11-12 fail
        # tickets): the drift and cure A draw their summaries as the base does
        "summary_mix_as_base": True,
        # run 5: the base's vision tower trains (runs 1-4 kept the random-init tower frozen, and Stage-A kept
        # 0-7 % of grounding's and cabling's negative items), at 4 blocks x 256 (the preset's 2 x 128), 1.5x as long
        "base_freeze_vision": False,
        "base_vision_depth": 4,
        "base_vision_width": 256,
        "base_steps": 1000,
        "base_lr": 5e-4,
        # safety caps above the measured time with 4 processes (run 5: 9.1 min for 1,000 steps; the new mix has more
        # photo rows per batch, which the plan's estimate does not model)
        "base_max_minutes": 13.0,
        "teacher_steps": 800,  # was 1200: the critical path did not fit a call (1.2x the base's 650 of runs 1-4)
        "teacher_max_minutes": 9.0,  # run 3: 6.5 min
        "drift_steps": 300,
        "drift_lr": 2e-4,
        "drift_max_minutes": 3.5,
        "lenient_ratio": 6.0,
        "distill_per_cell": 250,  # 2,000 Teacher tickets (run 1-2: 400, run 3: 1,000; each costs ~15 ms of rollouts)
        # half of each fail cell drawn round-robin over the seed's negative items, the rest at random (run 3: all at
        # random; seed 0's cure A kept passing 弯曲半径不合理 / 无保护措施, which 1 in 8 cabling fail tickets carry)
        "distill_negative_share": 0.5,
        "distill_rollouts": 4,
        "distill_epochs": 2,
        "reflection_tokens": 256,
        "distill_fallback": False,  # an empty distill file stops cure_a (the Teacher wrote no valid answer)
        "cure_a_steps": 500,
        "cure_a_lr": 3e-4,  # run 1-2: 2e-4, still improving when stopped
        "cure_a_k": 4,
        "cure_a_share": 0.5,
        "cure_a_max_minutes": 8.0,
        "lora_r": 16,
        "grpo_steps": 250,  # one pass over the 4,000 train tickets (run 2: 120, under half)
        "grpo_prompts": 16,
        "grpo_generations": 8,
        "grpo_lr": 3e-4,  # run 1-2: 1e-4 moved the policy too slowly
        "grpo_temperature": 1.0,
        "grpo_beta": 0.0,  # no KL anchor to the drifted reference the cure must leave (TRL's default); run 1-2: 0.04
        "grpo_max_minutes": 8.0,
        # the penalty arm's own: run 3's lr 3e-4 without a KL term collapsed seed 0 to all-fail, run 2's 1e-4 with
        # β 0.04 did not collapse and did not cure; runs 4-5 kept 3e-4 and anchored it with β 0.04, and seed 0
        # overshot in run 5 (0 false passes, 25 false fails); now 2e-4 (run 7, seed 0: 6 false passes, 5 false fails)
        "penalty_lr": 2e-4,
        "penalty_beta": 0.04,
        "fail_rescue": True,
        "max_new_tokens": 64,
        "summary_tokens": 128,
        "eval_batch": 100,
        "e2e_batch": 32,
        "kv_memory_gb": 4.0,  # each process's KV pool (the default, 30 % of free memory, is per process: 4 of them filled an H200)
    },
    "cpu": {
        "model": "tiny",
        "teacher_model": "tiny",
        "train": 2,
        "val": 1,
        "test": 1,
        "sft_batch": 4,
        "sft_workers": 0,
        "stage_b_ratio": 2.0,
        "base_stage_b_ratio": 1.0,
        "base_finding_oversample": 4.0,  # the smoke run exercises the option
        "base_verdict_oversample": 4.0,  # and this one
        "base_rare_finding_oversample": 16.0,  # and this one
        "base_bend_finding_oversample": 8.0,  # and this one
        "summary_mix_as_base": True,  # and this one
        "base_freeze_vision": False,
        "base_vision_depth": 0,  # the tiny preset's tower
        "base_vision_width": 0,
        "base_steps": 6,
        "base_lr": 3e-3,
        "base_max_minutes": 0.0,
        "teacher_steps": 4,
        "teacher_max_minutes": 0.0,
        "drift_steps": 4,
        "drift_lr": 1e-3,
        "drift_max_minutes": 0.0,
        "lenient_ratio": 2.0,
        "distill_per_cell": 1,
        "distill_negative_share": 0.5,
        "distill_rollouts": 2,
        "distill_epochs": 2,
        "reflection_tokens": 16,
        "distill_fallback": True,  # the tiny random Teacher writes nothing valid: reference answers, marked
        "cure_a_steps": 4,
        "cure_a_lr": 1e-3,
        "cure_a_k": 2,
        "cure_a_share": 0.5,
        "cure_a_max_minutes": 0.0,
        "lora_r": 4,
        "grpo_steps": 2,
        "grpo_prompts": 2,
        "grpo_generations": 2,
        "grpo_lr": 5e-4,
        "grpo_temperature": 1.0,
        "grpo_beta": 0.04,
        "grpo_max_minutes": 0.0,
        "penalty_lr": 5e-4,
        "penalty_beta": 0.04,
        "fail_rescue": True,
        "max_new_tokens": 12,
        "summary_tokens": 12,
        "eval_batch": 8,
        "e2e_batch": 4,
        "kv_memory_gb": None,  # the engine's CPU default
    },
}


def with_older_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Settings read from the ``state.json`` of an older run, in today's keys, completed with the keys added since
    and the values that reproduce what it ran (runs 1-4: a frozen preset tower; runs 1-5: the embedded mix at the
    shared ratio; runs 1-6: no verdict drawn more often; runs 1-7: no finding above the others; runs 1-8: no rule of
    弯曲半径不合理's own, the drift and cure A's summaries drawn as the embedded mix draws them), so ``--report-only`` and ``--rerun`` still work on its folder."""
    s = dict(saved)
    renamed = {"vision_depth": "base_vision_depth", "vision_width": "base_vision_width"}  # run 5's names
    for old, new in renamed.items():
        if old in s:
            s[new] = s.pop(old)
    if "base_trains_vision" in s:
        s["base_freeze_vision"] = not s.pop("base_trains_vision")
    defaults = {"base_freeze_vision": True, "base_vision_depth": 0, "base_vision_width": 0}
    defaults |= {
        "base_stage_b_ratio": s["stage_b_ratio"],
        "base_finding_oversample": 1.0,
        "base_verdict_oversample": 1.0,
        "base_rare_finding_oversample": 0.0,
        "base_bend_finding_oversample": 0.0,
        "summary_mix_as_base": False,
    }
    return defaults | s


# Alone-on-the-GPU seconds, from the H200 run of 2026-12-03 (docs/RESULTS.md; each step's measured window with
# 4 processes sharing the GPU divided by slowdown(4) = 1.5): process start-up ~20 s, full fusion SFT ~0.29 s a
# step of 64 rows, LoRA fusion SFT (cure A) ~0.2 s, GRPO ~0.75 s a step of 16 x 8, a Stage-B verdict ~0.03 s and
# an end-to-end ticket ~0.01 s in batches, a distill rollout ~0.003 s a ticket (batches of 100).
START_S, SFT_STEP_S, LORA_STEP_S, GRPO_STEP_S, VERDICT_S, E2E_S = 20.0, 0.29, 0.2, 0.75, 0.03, 0.01
ROLLOUT_S = 0.003  # per ticket and rollout of the distill run
# the base (its trained 4 x 256 tower, the photo-heavy mix): run 7's seed-1 base ran alone on one H100, 245 s for
# 1,000 steps (the shared 0.29 s a step above gave 5.2 minutes)
BASE_STEP_S = 0.225
EXPORT_S = 30.0  # tools/export.py: load base + adapter, merge, save (start-up included)


def minutes(s: dict[str, Any]) -> dict[str, float]:
    """Estimated minutes per step kind, each *alone* on the GPU (``proof/dag.py`` scales them for
    concurrency); from the figures above and the profile's sizes, so ``--set`` moves them. CPU: the smoke
    run's rough 1-2 minutes a step."""
    if s["device"] == "cpu":
        return dict.fromkeys(("teacher", "distill", "base", "drift", "cure_a", "cure_b", "cure_b_penalty", "eval"), 1.5) | {"data": 0.2}  # fmt: skip
    tickets = 4 * s["test"]  # four missions
    distill_tickets = 8 * s["distill_per_cell"]  # four missions x pass / fail
    sft = lambda steps, extra=0.0, step_s=SFT_STEP_S: (START_S + steps * step_s + extra) / 60  # noqa: E731
    grpo = (START_S + s["grpo_steps"] * GRPO_STEP_S + EXPORT_S) / 60
    # rollouts: every reflection epoch but the last, then the final one
    rollouts = s["distill_rollouts"] * (s["distill_epochs"] - 1) + 1
    return {
        "data": 0.6,  # 22-35 s measured (4000 / 100 / 200 tickets)
        "teacher": sft(s["teacher_steps"]),
        "base": sft(s["base_steps"], step_s=BASE_STEP_S),
        "drift": sft(s["drift_steps"], 5.0),  # + the lenient verdict file
        "cure_a": sft(s["cure_a_steps"], EXPORT_S, LORA_STEP_S),
        "cure_b": grpo,
        "cure_b_penalty": grpo,
        "distill": (START_S + distill_tickets * ROLLOUT_S * rollouts + 30) / 60,  # + the reflection calls
        "eval": (2 * START_S + tickets * (VERDICT_S + E2E_S)) / 60,  # +experiment=eval, then +experiment=e2e
    }  # fmt: skip


def memory_gb(s: dict[str, Any]) -> dict[str, float]:
    """Peak GPU memory (GiB) per step kind alone, for the scheduler's budget (``proof/dag.py``). cuda: what
    ``nvidia-smi`` showed on one H100 during run 7 (2026-12-07, the cuda profile's sizes), the caching allocator's
    reserve of each process: a base 48.0 (its trained 4 x 256 tower and mixed photo rows), the Teacher 26.1, the
    distill rollouts 8.3, a drift 22.5, the three cures 58.0 together, an eval under 8; each rounded up a little.
    A ``--set`` that changes batch or model sizes does not move them; ``--gpu-memory-gb 0`` turns the budget off.
    Since run 9 each process's own peak reserve is in its metrics.json and the report (per step kind, beside these).
    cpu: none (no GPU)."""
    measured = {"data": 0.0, "teacher": 27.0, "distill": 9.0, "base": 48.5, "drift": 23.0,
                "cure_a": 20.0, "cure_b": 20.0, "cure_b_penalty": 20.0, "eval": 8.0}  # fmt: skip
    return dict.fromkeys(measured, 0.0) if s["device"] == "cpu" else measured


DEFAULT_JOBS = {"cuda": 4, "cpu": 1}  # steps at once: several small-model processes share one GPU
PLAN_GPU_MEMORY_GB = 79.2  # --plan without the GPU visible: an 80 GB H100's memory as torch reports it (GiB)
PLAN_MINUTES = 9.0  # --plan's budget per call when --max-minutes is not given (a call must end within 10)
