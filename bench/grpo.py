"""GRPO step speed: our GRPOModule vs TRL 1.16 GRPOTrainer, same model and workload.

Qwen3-VL-4B shape, random bf16 weights, LoRA r16 on the last 4 blocks, beta 0.04, G 8, 8 prompts per step
(Stage-B prompts), 64 forced new tokens. Uniform: every prompt ~1000 tokens. ``--mixed``: each step's 8
prompts are tickets of 1 to 24 photos drawn at random (about 540 to 2,970 tokens), a new draw every step,
the same draws for both implementations. Totals count every step, the first one (captures, compiles) included.
Run each implementation in its own process so each peak-memory figure is its own:

    python bench/grpo.py --impl ours --out grpo_ours.json
    python bench/grpo.py --impl trl --out grpo_trl.json
    python bench/grpo.py --impl ours --mixed --steps 8 --out grpo_mixed_ours.json
    python bench/grpo.py --impl trl --mixed --steps 8 --out grpo_mixed_trl.json
    python bench/grpo.py --impl ours --mixed --steps 8 --compile-layers --out grpo_mixed_ours_compiled.json
    python bench/grpo.py --impl ours --mixed --steps 8 --prefill-chunk-tokens 2048 --out grpo_mixed_chunked.json
    python bench/grpo.py --impl ours --mixed --steps 8 --overlap-prefill --out grpo_mixed_overlapped.json
    python bench/grpo.py --impl ours --preset tiny --device cpu --prompt-tokens 200 --steps 2   # CPU smoke

``--compile-layers`` (ours only): the decode step's layers compiled regionally (``generation.compile_layers``);
the JSON then records ``compiles`` and ``compile_seconds`` (inside the first step's time) beside the captures.

Ours also records where each step's time goes (``phase_seconds``: rollout, frozen prefix, reference log-probs,
optimisation, the rest; the GPU synchronised at each boundary), and ``--profile-step N`` runs step N under
``torch.profiler`` and writes its top operators by CPU and by CUDA time into the JSON (``profile``), to see what
a first step spends that later ones do not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from common import (
    add_no_cudnn_attention,
    add_no_fused_rms_norm,
    add_overlap_prefill,
    add_prefill_chunk_tokens,
    device_info,
    random_bundle,
    sync,
    write,
)

from bbuqc_lightning.models.chat_template import QWEN3_VL_CHAT_TEMPLATE
from bbuqc_lightning.models.lora import apply_last_k_lora
from bbuqc_lightning.stage_b.builder import build_stage_b_samples
from bbuqc_lightning.stage_b.rewards import format_reward, label_reward
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.summaries.records import normalise_stage_a_record

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = "BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备按要求配备了挡风板×1，螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求×3"
# A field photo's summary (~106 tokens): tickets of 1..24 photos give Stage-B prompts of ~540..2,970 tokens.
FIELD_SUMMARY = (
    "BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备按要求配备了挡风板×1，螺丝、光纤插头/BBU安装螺丝,显示完整,"
    "符合要求×3，光纤/有保护措施,弯曲半径合理/蛇形管×2，电线/捆扎整齐×1，标签/可以识别×4，备注: 机柜右侧有部分遮挡，"
    "无法判断是否有足够空间安装挡风板"
)


def prompt_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text).input_ids)


def samples(tokenizer: Any, n: int, prompt_tokens: int) -> list[StageBSample]:
    """``n`` Stage-B samples whose prompts are about ``prompt_tokens`` long."""
    templates = yaml.safe_load((ROOT / "conf" / "prompts" / "stage_b.yaml").read_text())
    out = []
    for i in range(n):
        images = 1
        while True:
            record = normalise_stage_a_record(
                {
                    "group_id": f"QC-TEMP-20250101-{i:07d}",
                    "mission": "挡风板安装检查",
                    "label": "fail" if i % 2 else "pass",
                    "per_image": {f"图片_{k + 1}": SUMMARY for k in range(images)},
                }
            )
            sample = build_stage_b_samples([record], templates, None)[0][0]
            length = prompt_length(tokenizer, sample.messages)
            if length >= prompt_tokens:
                break
            images += 1
        out.append(sample)
    return out


def mixed_samples(n: int, seed: int = 0, max_photos: int = 24) -> list[StageBSample]:
    """``n`` Stage-B samples of tickets with 1..``max_photos`` photos each, drawn with ``seed``."""
    import random

    templates = yaml.safe_load((ROOT / "conf" / "prompts" / "stage_b.yaml").read_text())
    rng = random.Random(seed)
    out = []
    for i in range(n):
        record = normalise_stage_a_record(
            {
                "group_id": f"QC-TEMP-20250101-{i:07d}",
                "mission": "挡风板安装检查",
                "label": "fail" if i % 2 else "pass",
                "per_image": {f"图片_{k + 1}": FIELD_SUMMARY for k in range(rng.randint(1, max_photos))},
            }
        )
        out.append(build_stage_b_samples([record], templates, None)[0][0])
    return out


def run_ours(
    args: argparse.Namespace, bundle: Any, data: list[StageBSample], extra: dict[str, Any]
) -> list[float]:
    import functools

    import lightning as L

    from bbuqc_lightning.generation.engine import GenerationEngine
    from bbuqc_lightning.grpo.config import GRPOConfig
    from bbuqc_lightning.grpo.module import GRPOModule

    config = GRPOConfig(
        num_generations=8, max_new_tokens=args.new_tokens, temperature=0.7, beta=0.04, learning_rate=5e-6
    )
    module = GRPOModule(
        bundle,
        config,
        {"label": label_reward, "format": format_reward},
        functools.partial(torch.optim.AdamW, lr=5e-6),
        lora=functools.partial(apply_last_k_lora, k=4, r=16, alpha=32, dropout=0.05),
        micro_batch_size=args.micro_batch,
        generation=functools.partial(
            GenerationEngine,
            cuda_graphs=not args.no_graphs,
            compile_layers=args.compile_layers,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            overlap_prefill=args.overlap_prefill,
            overlap_decode_priority=args.overlap_decode_priority,
            overlap_switch_interval=args.overlap_switch_interval,
            max_rows=args.prompts * 8,
            prompt_slots=args.prompts,
            max_prompt_len=4096 if args.mixed else 2048,
            max_new_tokens=args.new_tokens,
        ),
    )
    module.sampling = replace(module.sampling, min_new_tokens=args.new_tokens)
    times: list[float] = []
    phases: dict[str, float] = {}
    time_phases(module, phases)
    profiler: list[Any] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            if len(times) + 1 == args.profile_step:
                profiler.append(torch.profiler.profile(activities=profiled_activities()))
                profiler[0].__enter__()
            phases.clear()
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            sync()
            times.append(time.perf_counter() - self.start)
            phases["other"] = times[-1] - sum(phases.values())
            extra.setdefault("phase_seconds", []).append({k: round(v, 4) for k, v in phases.items()})
            if profiler and len(times) == args.profile_step:
                profiler[0].__exit__(None, None, None)
                extra["profile"] = {"step": len(times), **profile_tables(profiler[0])}
            generation = float(trainer.callback_metrics.get("train/generation_seconds", float("nan")))
            extra.setdefault("generation_seconds", []).append(generation)
            extra.setdefault("engine_stats", []).append(module.engine.stats)  # cumulative, per step
            record_memory(extra)
            print(f"ours step {len(times)}: {times[-1]:.2f} s (generation {generation:.2f} s)", flush=True)

    loader = torch.utils.data.DataLoader(data, batch_size=args.prompts, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, train_dataloaders=loader)
    if module.engine.decode_step is not None:
        extra["captures"] = module.engine.decode_step.captures
        extra["capture_seconds"] = module.engine.decode_step.capture_seconds
        extra["compile_layers"] = args.compile_layers
        extra["prefill_chunk_tokens"] = args.prefill_chunk_tokens
        extra["overlap_prefill"] = args.overlap_prefill
        extra["overlap_decode_priority"] = args.overlap_decode_priority
        extra["overlap_switch_interval"] = args.overlap_switch_interval
        extra["compiles"] = module.engine.decode_step.compiles
        extra["compile_seconds"] = module.engine.decode_step.compile_seconds
        extra["pool"] = module.engine.layout.describe()
        extra["engine_stats"] = module.engine.stats  # prefill / decode / chunked-prefill seconds and counts
    return times


def time_phases(module: Any, phases: dict[str, float]) -> None:
    """Wrap the phases of ``GRPOModule.training_step`` with synchronised timers (this benchmark only)."""
    import bbuqc_lightning.grpo.module as grpo_module

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    grpo_module.generate_rollout = timed("rollout", grpo_module.generate_rollout)
    grpo_module.run_frozen_prefix = timed("frozen_prefix", grpo_module.run_frozen_prefix)
    module._reference_and_old = timed("reference", module._reference_and_old)
    module._optimise = timed("optimise", module._optimise)


def profiled_activities() -> list[Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def profile_tables(prof: Any, rows: int = 25) -> dict[str, str]:
    averages = prof.key_averages()
    tables = {
        "cpu_top": averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    }
    if torch.cuda.is_available():
        tables["cuda_top"] = averages.table(
            sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70
        )
    return tables


def run_trl(
    args: argparse.Namespace, bundle: Any, data: list[StageBSample], extra: dict[str, Any]
) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = bundle.tokenizer
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    rows = [{"prompt": s.messages, **s.reward_columns()} for s in data]
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=args.trl_micro_batch or args.prompts * 8,
        gradient_accumulation_steps=(args.prompts * 8) // (args.trl_micro_batch or args.prompts * 8),
        shuffle_dataset=False,  # the same prompts per step as ours
        num_generations=8,
        max_completion_length=args.new_tokens,
        temperature=0.7,
        beta=0.04,
        learning_rate=5e-6,
        bf16=args.device == "cuda",
        use_cpu=args.device != "cuda",
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        generation_kwargs={"min_new_tokens": args.new_tokens},
    )
    n_layers = bundle.model.config.text_config.num_hidden_layers
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(n_layers - 4, n_layers)),
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync()
            times.append(time.perf_counter() - self.start)
            record_memory(extra)
            print(f"trl step {len(times)}: {times[-1]:.2f} s", flush=True)

    trainer = GRPOTrainer(
        model=bundle.model,
        reward_funcs=[label_reward, format_reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Timer()],
    )
    trainer.train()
    return times


def record_memory(extra: dict[str, Any]) -> None:
    """Peak GPU memory of the step just ended (then reset), to show whether it stays flat."""
    if torch.cuda.is_available():
        extra.setdefault("step_peak_memory_gb", []).append(torch.cuda.max_memory_allocated() / 1e9)
        extra.setdefault("overall_peak", []).append(extra["step_peak_memory_gb"][-1])
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["ours", "trl"], required=True)
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/bench_grpo")
    parser.add_argument(
        "--trl-micro-batch",
        type=int,
        default=None,
        help="TRL: completions per forward/backward (gradient accumulation over the 64); default all 64 at once",
    )
    parser.add_argument("--max-photos", type=int, default=24, help="--mixed: photos per ticket, 1 to this")
    parser.add_argument("--mixed", action="store_true", help="tickets of 1..24 photos, a new draw per step")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    parser.add_argument(
        "--compile-layers", action="store_true", help="ours: compile the decode step's layers regionally"
    )
    parser.add_argument(
        "--profile-step", type=int, default=0, help="ours: run this step (1-based) under torch.profiler"
    )
    add_no_cudnn_attention(parser)
    add_no_fused_rms_norm(parser)
    add_prefill_chunk_tokens(parser)
    add_overlap_prefill(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    bundle = random_bundle(
        args.preset,
        args.device,
        dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
        # TRL as its users run it: HF's modules
        fused_rms_norm=args.impl == "ours" and not args.no_fused_rms_norm,
    )
    if args.mixed:
        data = mixed_samples(args.prompts * args.steps, max_photos=args.max_photos)
    else:
        data = samples(bundle.tokenizer, args.prompts, args.prompt_tokens) * args.steps
    lengths = [prompt_length(bundle.tokenizer, d.messages) for d in data]
    extra: dict[str, Any] = {}
    times = (run_ours if args.impl == "ours" else run_trl)(args, bundle, data, extra)
    steady = times[1:] if len(times) > 1 else times
    step = statistics.median(steady)
    completions = args.prompts * 8
    peaks = extra.pop("overall_peak", [])
    result = {
        "impl": args.impl,
        "config": vars(args),
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "device": device_info(),
        "step_seconds": times,
        "median_step_seconds_after_first": step,
        "completions_per_s": completions / step,
        "completions_per_s_all_steps": completions * len(times) / sum(times),
        "peak_memory_gb": max(peaks) if peaks else None,
        **extra,
    }
    write(args.out, result)


if __name__ == "__main__":
    main()
