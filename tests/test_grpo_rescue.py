"""A fail ticket whose G samples never say 不通过 gives GRPO no signal: counted, and rescued on request by
rewriting one valid answer's verdict (only its verdict tokens trained)."""

from __future__ import annotations

import torch

from bbuqc_lightning.constants import IM_END_ID
from bbuqc_lightning.grpo.advantages import combine_rewards, compute_advantages
from bbuqc_lightning.grpo.rescue import blind_fail_groups, rescue_fail_groups
from bbuqc_lightning.grpo.rollout import Rollout, score
from bbuqc_lightning.models.factory import build_tokenizer
from bbuqc_lightning.stage_b.rewards import format_reward, label_reward
from bbuqc_lightning.stage_b.sample import StageBSample

REWARDS = {"label": label_reward, "format": format_reward}
PASS = "通过\n理由: 图片_1显示各要素齐全。"
FAIL = "不通过\n理由: 图片_1螺丝未拧紧。"


def sample(label: str, i: int = 0) -> StageBSample:
    return StageBSample([], f"G{i}", f"G{i}::{label}", "BBU安装方式检查（正装）", label, ["螺丝/未拧紧×1"])


def rollout(texts: list[str], labels: list[str], prompt_len: int = 3, width: int = 24) -> Rollout:
    tokenizer = build_tokenizer()
    n = len(texts)
    completion = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.int)
    for row, text in enumerate(texts):
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], IM_END_ID]
        completion[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    samples = [sample(label, i) for i, label in enumerate(labels)]
    prompt = torch.full((n, prompt_len), 7, dtype=torch.long)
    return Rollout(
        input_ids=torch.cat([prompt, completion], dim=1),
        attention_mask=torch.cat([torch.ones((n, prompt_len), dtype=torch.int), mask], dim=1),
        completion_ids=completion,
        completion_mask=mask,
        truncated=torch.zeros(n, dtype=torch.bool),
        texts=list(texts),
        rewards_per_func=score(REWARDS, list(texts), samples),
        samples=samples,
    )


def test_blind_fail_groups_are_counted() -> None:
    texts = [PASS, PASS, PASS, FAIL, PASS, PASS, "乱写", "乱写"]
    labels = ["fail"] * 2 + ["fail"] * 2 + ["pass"] * 2 + ["fail"] * 2
    assert blind_fail_groups(texts, [sample(x, i) for i, x in enumerate(labels)], 2) == (3, [0, 3])


def test_rescue_rewrites_one_valid_answer_and_gives_the_group_a_signal() -> None:
    r = rollout([PASS, PASS, PASS, FAIL], ["fail", "fail", "fail", "fail"])
    before = compute_advantages(combine_rewards(r.rewards_per_func, [1.0, 0.2]), 2, "group")[0]
    assert torch.equal(before[:2], torch.zeros(2))  # blind group: no signal at all
    _, blind = blind_fail_groups(r.texts, r.samples, 2)
    rescued = rescue_fail_groups(r, blind, build_tokenizer(), IM_END_ID, REWARDS, 2)
    assert list(rescued) == [0]  # one answer of group 0; group 1 already had its 不通过
    assert r.texts[0] == "不通过\n理由: 图片_1显示各要素齐全。" and r.texts[1] == PASS
    assert r.rewards_per_func[0].tolist() == [1.0, 1.0]
    tokenizer = build_tokenizer()
    ids = r.completion_ids[0][r.completion_mask[0].bool()].tolist()
    assert tokenizer.decode(ids[:-1]) == r.texts[0] and ids[-1] == IM_END_ID
    assert torch.equal(r.input_ids[0, 3:], r.completion_ids[0])  # prompt kept, completion replaced
    assert tokenizer.decode(ids[: rescued[0]]) == "不通过"  # the tokens the loss keeps
    after = compute_advantages(combine_rewards(r.rewards_per_func, [1.0, 0.2]), 2, "group")[0]
    assert after[0] > 0 > after[1]  # 不通过 pushed up, 通过 down, on that ticket


def test_a_group_without_any_valid_answer_is_left_alone() -> None:
    r = rollout(["乱写", "也乱写"], ["fail", "fail"])
    assert rescue_fail_groups(r, [0], build_tokenizer(), IM_END_ID, REWARDS, 2) == {}
    assert r.texts == ["乱写", "也乱写"]


def test_the_module_trains_only_the_verdict_tokens_of_a_rescued_answer() -> None:
    from bbuqc_lightning.grpo.config import GRPOConfig
    from bbuqc_lightning.grpo.module import GRPOModule

    module = GRPOModule.__new__(GRPOModule)  # only _loss_mask is exercised: no model needed
    module.grpo = GRPOConfig(num_generations=2, fail_rescue=True)
    r = rollout([PASS, PASS], ["fail", "fail"])
    mask = module._loss_mask(r, torch.zeros(2), {0: 2})
    assert mask[0].tolist()[:3] == [1, 1, 0] and mask[0].sum() == 2
    assert torch.equal(mask[1], r.completion_mask[1])
