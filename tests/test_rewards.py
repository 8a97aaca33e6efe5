"""Stage-B rewards: TRL calling convention, unweighted values, and one real ``trl.GRPOTrainer`` step."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import hydra
import pytest
from omegaconf import DictConfig

from bbuqc_lightning.stage_b.rewards import (
    completion_text,
    false_pass_penalty,
    format_reward,
    label_reward,
)

PASS = "通过\n理由: 图片_1螺丝齐全且符合要求。"
FAIL = "不通过\n理由: 图片_2光纤无保护措施。"
BAD = "通过。\n理由: 多了句号。"
SUMMARY = "光纤/无保护措施,弯曲半径不合理×1"


def _conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_label_reward_matches_label_and_invalid_is_zero() -> None:
    completions = [PASS, PASS, FAIL, FAIL, BAD]
    labels = ["pass", "fail", "fail", "pass", "pass"]
    assert label_reward(completions, group_label=labels) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_format_reward_is_unweighted_zero_or_one() -> None:
    assert format_reward([PASS, FAIL, BAD, ""]) == [1.0, 1.0, 0.0, 0.0]


def test_false_pass_penalty_only_for_valid_pass_on_fail_label() -> None:
    completions = [PASS, PASS, FAIL, BAD]
    labels = ["fail", "pass", "fail", "fail"]
    assert false_pass_penalty(completions, group_label=labels) == [-1.0, 0.0, 0.0, 0.0]


def test_conversational_completions_use_last_assistant_message() -> None:
    completions = [_conv(PASS), [{"role": "user", "content": "x"}, {"role": "assistant", "content": FAIL}]]
    assert label_reward(completions, group_label=["pass", "fail"]) == [1.0, 1.0]
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "通过\n"}, {"type": "text", "text": "理由: 好"}],
        }
    ]
    assert completion_text(parts) == "通过\n理由: 好"


def test_summaries_kwarg_enables_no_copy_rule() -> None:
    copied = f"不通过\n理由: 图片_1为{SUMMARY}。"
    assert format_reward([copied]) == [1.0]
    assert format_reward([copied], summaries=[[SUMMARY]]) == [0.0]
    assert label_reward([copied], group_label=["fail"], summaries=[[SUMMARY]]) == [0.0]


def test_trl_extra_kwargs_are_ignored() -> None:
    extras = {"prompts": ["p"], "completion_ids": [[1]], "trainer_state": None, "log_metric": print}
    assert label_reward([PASS], group_label=["pass"], task_type=["BBU接地线检查"], **extras) == [1.0]


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels"):
        label_reward([PASS, FAIL], group_label=["pass"])


def length_reward(completions: list[str], **kwargs: object) -> list[float]:
    """A reward of a user's own, named in config by its dotted import path."""
    return [float(len(c)) for c in completions]


def test_grpo_config_is_the_name_to_reward_table(compose: Callable[[list[str]], DictConfig]) -> None:
    """GRPO's rewards come from one table, ``module.reward_funcs``: names -> dotted import paths."""
    extra = [
        "+module.reward_funcs.length._target_=test_rewards.length_reward",
        "+module.reward_funcs.length._partial_=true",
    ]
    cfg = compose(["+experiment=grpo", *extra])
    table = hydra.utils.instantiate(cfg.module.reward_funcs)
    assert {name: func.func for name, func in table.items()} == {
        "label": label_reward,
        "format": format_reward,
        "false_pass": false_pass_penalty,
        "length": length_reward,
    }
    with pytest.raises(hydra.errors.InstantiationException, match="nope"):
        hydra.utils.instantiate({"_target_": "bbuqc_lightning.stage_b.rewards.nope", "_partial_": True})


def _tiny_qwen3(vocab_size: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    return Qwen3ForCausalLM(config)


def _grpo_dataset():
    from datasets import Dataset

    from bbuqc_lightning.stage_b.builder import build_stage_b_samples
    from bbuqc_lightning.stage_b.prompts import StageBTemplates

    templates = StageBTemplates(
        system="判断工单是否通过，两行输出。",
        user="{mission}\n{guidance}\n{summaries}",
        mission_focus={"BBU接地线检查": "接地"},
        no_guidance="无",
    )
    records = [
        {
            "group_id": f"QC-T-20250101-{i}",
            "ticket_key": f"QC-T-20250101-{i}::{label}",
            "label": label,
            "mission": "BBU接地线检查",
            "per_image": {"图片_1": SUMMARY},
        }
        for i, label in enumerate(["pass", "fail"])
    ]
    samples, _ = build_stage_b_samples(records, templates, None)
    return Dataset.from_list([{"prompt": s.messages, **s.reward_columns()} for s in samples])


def test_rewards_run_inside_trl_grpo_trainer(tmp_path: Path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    from bbuqc_lightning.models.factory import build_tokenizer

    tokenizer = build_tokenizer()
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        reward_weights=[1.0, 0.2],
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    seen: dict[str, object] = {}

    @functools.wraps(format_reward)  # keeps __name__, which TRL uses for the metric key
    def spy_format_reward(completions, **kwargs):
        seen.update(kwargs)
        return format_reward(completions, **kwargs)

    trainer = GRPOTrainer(
        model=_tiny_qwen3(len(tokenizer)),
        reward_funcs=[label_reward, spy_format_reward],
        args=args,
        train_dataset=_grpo_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for key in ("rewards/label_reward/mean", "rewards/format_reward/mean", "rewards/label_reward/std"):
        assert key in logged and math.isfinite(logged[key])
    assert 0.0 <= logged["rewards/format_reward/mean"] <= 1.0
    assert seen["summaries"] == [[SUMMARY]] * 4  # dataset columns reach the reward, one row per completion
    assert sorted(seen["group_label"]) == ["fail", "fail", "pass", "pass"]
