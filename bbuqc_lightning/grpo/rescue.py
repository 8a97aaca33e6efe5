"""Fail tickets whose G samples never say 不通过: measured every step, and optionally given a signal.

A group's advantage is its rewards minus their mean: when a fail ticket's G completions all say 通过 (a
student drifted toward passing), every reward is equal, the group contributes nothing, and GRPO can never
teach the student to fail that ticket — exactly the false passes one wants to remove. What happens:

- always: ``train/fail_groups_without_fail`` (share of the batch's fail-labelled groups with no valid
  不通过 sample) and ``train/fail_groups_rescued`` are logged, so a user sees how much of the batch is blind;
- with ``grpo.fail_rescue: true``: in each such group one completion that parses (a valid 通过 answer) is
  rewritten to say 不通过 — its verdict line replaced, its reason line kept as the model wrote it — its
  rewards are recomputed, and only the verdict line's tokens stay in the loss. The group then has one right
  answer among G wrong ones: its advantage pushes 不通过 up on that ticket and 通过 down, the way a reviewer
  would correct the student. The reason text is not trained (it argued for 通过), so the model is never
  taught a reason that contradicts its verdict. A group with no valid completion at all is left alone
  (format comes first; the format reward already separates its answers).

This is an off-policy token sequence in an on-policy method (a departure from TRL, listed in
``grpo/module.py``); it touches only groups that would otherwise give no gradient.

Example::

    blind = blind_fail_groups(rollout.texts, rollout.samples, num_generations=8)
    rescued = rescue_fail_groups(rollout, blind, tokenizer, eos_token_id, reward_funcs, 8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bbuqc_lightning.constants import LABEL_TO_VERDICT
from bbuqc_lightning.grpo.rollout import Rollout, score
from bbuqc_lightning.stage_b.contract import parse_verdict
from bbuqc_lightning.stage_b.rewards import RewardFunc
from bbuqc_lightning.stage_b.sample import StageBSample


def blind_fail_groups(
    texts: Sequence[str], samples: Sequence[StageBSample], num_generations: int
) -> tuple[int, list[int]]:
    """``(fail-labelled groups, indices of those with no valid 不通过 completion)``; rows grouped by prompt."""
    fail_groups, blind = 0, []
    for group in range(len(texts) // num_generations):
        rows = range(group * num_generations, (group + 1) * num_generations)
        sample = samples[rows[0]]
        if sample.label != "fail":
            continue
        fail_groups += 1
        summaries = list(sample.summaries)
        verdicts = [parse_verdict(texts[r], summaries) for r in rows]
        if not any(v.valid and v.verdict == "fail" for v in verdicts):
            blind.append(group)
    return fail_groups, blind


def rescue_fail_groups(
    rollout: Rollout,
    groups: Sequence[int],
    tokenizer: Any,
    eos_token_id: int,
    reward_funcs: Mapping[str, RewardFunc],
    num_generations: int,
) -> dict[int, int]:
    """Rewrite one valid completion per group in ``groups`` to 不通过 (in place); ``{row: verdict tokens}``.

    The returned count is how many leading completion tokens of the row carry the verdict: the caller keeps
    only those in the loss mask.
    """
    rescued: dict[int, int] = {}
    width = rollout.completion_ids.shape[1]
    prompt_len = rollout.prompt_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    for group in groups:
        rows = range(group * num_generations, (group + 1) * num_generations)
        summaries = list(rollout.samples[rows[0]].summaries)
        row = next((r for r in rows if parse_verdict(rollout.texts[r], summaries).valid), None)
        if row is None:
            continue
        _, _, rest = rollout.texts[row].strip().partition("\n")
        verdict_ids = tokenizer(LABEL_TO_VERDICT["fail"], add_special_tokens=False)["input_ids"]
        rest_ids = tokenizer("\n" + rest, add_special_tokens=False)["input_ids"]
        ids = [*(verdict_ids + rest_ids)[: width - 1], eos_token_id]
        new = torch.full(
            (width,), pad, dtype=rollout.completion_ids.dtype, device=rollout.completion_ids.device
        )
        new[: len(ids)] = torch.tensor(ids, dtype=new.dtype, device=new.device)
        mask = torch.zeros(width, dtype=rollout.completion_mask.dtype, device=new.device)
        mask[: len(ids)] = 1
        rollout.completion_ids[row] = new
        rollout.completion_mask[row] = mask
        rollout.input_ids[row, prompt_len:] = new
        rollout.attention_mask[row, prompt_len:] = mask
        rollout.truncated[row] = False
        rollout.texts[row] = f"{LABEL_TO_VERDICT['fail']}\n{rest}"
        values = score(reward_funcs, [rollout.texts[row]], [rollout.samples[row]])
        rollout.rewards_per_func[row] = values[0].to(rollout.rewards_per_func.device)
        rescued[row] = min(len(verdict_ids), len(ids))
    return rescued
