"""Stage-B GRPO as a LightningModule (``+experiment=grpo``).

One training step = one generation batch: sample G completions per prompt (shared engine, each prompt
prefilled once), score them with the reward functions, turn rewards into group advantages, then run
``num_iterations`` optimiser steps over micro-batches with TRL 1.16's loss (``grpo/loss.py``).

Speed by design:
1. each prompt runs once per group in every forward pass (its G rollouts attend to its keys/values), and
   the frozen first L-K layers run once per generation batch, shared by the policy, the old-policy and
   the reference passes (``grpo/forward.py``); only the last K LoRA layers run per pass;
2. the reference is the same weights with adapters disabled (no second copy of the model);
3. log-probs are computed at completion positions only, in chunks of ``logprob_chunk_size`` tokens
   (``grpo/logprobs.py``), so the (N, T, 151936) fp32 logits never exist at once;
4. every prompt is prefilled once and its KV cache shared by its G rollouts (``generation/engine.py``).

Departures from TRL 1.16 (the loss maths is identical, tested to 1e-6; see ``grpo/loss.py`` for the list
that concerns the loss):
1. A generation batch is optimised right away (``steps_per_generation == 1`` in TRL terms); micro-batches
   of ``micro_batch_size`` rows play TRL's gradient-accumulation role within it.
2. ``dynamic_sampling`` (DAPO) drops groups whose G rewards are equal from the loss mask instead of
   re-sampling new prompts to refill the batch.
3. The reference forward shares the policy's frozen-prefix hidden states, and every pass runs each prompt once
   for its G rollouts (equal in value and gradient to TRL's full per-row forward up to rounding, tested).
4. Generation runs through the project's engine (``conf/generation/``: continuous batching over a fixed KV pool,
   CUDA-graph decode per bucket, each prompt's keys/values shared by its G rollouts), not vLLM.
5. ``fail_rescue`` (off by default): a fail ticket whose G samples never say 不通过 gets one of its valid
   answers rewritten to 不通过, only the verdict tokens trained (``grpo/rescue.py``); how often a fail
   ticket's group is that blind is logged every step either way (``train/fail_groups_without_fail``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from bbuqc_lightning.constants import IM_END_ID
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.grpo.advantages import combine_rewards, compute_advantages, equal_reward_groups_mask
from bbuqc_lightning.grpo.config import GRPOConfig
from bbuqc_lightning.grpo.forward import (
    PrefixState,
    run_frozen_prefix,
    run_suffix,
    select_rows,
)
from bbuqc_lightning.grpo.logprobs import completion_logprobs
from bbuqc_lightning.grpo.loss import grpo_loss
from bbuqc_lightning.grpo.rescue import blind_fail_groups, rescue_fail_groups
from bbuqc_lightning.grpo.rollout import Rollout, generate_rollout
from bbuqc_lightning.models.decoder import output_embedding
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.models.lora import first_adapted_layer
from bbuqc_lightning.stage_b.evaluation import (
    TABLE_COLUMNS,
    evaluate_greedy,
    score_outputs,
    update_verdict_metrics,
)
from bbuqc_lightning.stage_b.metrics import VerdictMetrics
from bbuqc_lightning.stage_b.rewards import RewardFunc
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.tracking.checkpoint import TrainableStateCheckpointing
from bbuqc_lightning.tracking.wandb import log_table


class GRPOModule(TrainableStateCheckpointing, L.LightningModule):
    """GRPO on Stage-B prompts with LoRA on the last K LLM blocks; vision and aligner frozen."""

    def __init__(
        self,
        bundle: ModelBundle,
        grpo: GRPOConfig,
        reward_funcs: Mapping[str, RewardFunc],
        optimizer: Callable[..., torch.optim.Optimizer],
        lora: Callable[[torch.nn.Module], torch.nn.Module],
        micro_batch_size: int = 8,
        max_grad_norm: float | None = 1.0,
        val_max_new_tokens: int | None = None,
        num_table_samples: int = 8,
        generation: Callable[..., GenerationEngine] | None = None,
    ) -> None:
        super().__init__()
        self.model = lora(bundle.model)  # conf/lora/last_k.yaml: LoRA on the last K blocks, the rest frozen
        self.num_frozen = first_adapted_layer(self.model)  # layers below run once, without gradients
        self.engine = (generation or GenerationEngine)(self.model, bundle.processor)
        self.grpo = grpo
        self.reward_funcs = dict(reward_funcs)
        if grpo.reward_weights is not None and len(grpo.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"grpo.reward_weights has {len(grpo.reward_weights)} entries for "
                f"{len(self.reward_funcs)} reward functions ({list(self.reward_funcs)})"
            )
        self.optimizer_factory = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.sampling = SamplingParams(
            max_new_tokens=grpo.max_new_tokens,
            do_sample=True,
            temperature=grpo.temperature,
            top_p=grpo.top_p,
            num_return_sequences=grpo.num_generations,
        )
        self.greedy = SamplingParams(max_new_tokens=val_max_new_tokens or grpo.max_new_tokens)
        self.num_table_samples = num_table_samples
        self.train_verdicts = VerdictMetrics("train/")
        self.val_verdicts = VerdictMetrics("val/")
        self.test_verdicts = VerdictMetrics("test/")
        self._val_rows: list[list[Any]] = []
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable (LoRA) weights

    # ----------------------------------------------------------------- training
    def training_step(self, batch: list[StageBSample], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        rollout = generate_rollout(self.engine, batch, self.sampling, self.reward_funcs)
        gen_seconds = time.perf_counter() - start
        sampled_texts = list(rollout.texts)  # what the policy said (train/* verdict rates), before any rescue
        rescued, blind_stats = self._rescue(rollout)
        rewards = combine_rewards(rollout.rewards_per_func, self.grpo.reward_weights)
        gather = self.all_gather if self.trainer.world_size > 1 else None
        advantages, stats = compute_advantages(
            rewards, self.grpo.num_generations, self.grpo.scale_rewards, all_gather=gather
        )
        loss_mask = self._loss_mask(rollout, rewards, rescued)
        prefix = run_frozen_prefix(
            self.model,
            rollout.input_ids,
            rollout.attention_mask,
            completion_length=rollout.completion_ids.shape[1],
            group_size=self.grpo.num_generations,
            num_frozen=self.num_frozen,
        )
        ref, old = self._reference_and_old(prefix, rollout)
        losses, loss_metrics = self._optimise(prefix, rollout, loss_mask, advantages, ref, old)
        stats = {**stats, **blind_stats}
        self._log_train(
            rollout,
            rewards,
            advantages,
            stats,
            loss_metrics,
            losses,
            loss_mask,
            start,
            gen_seconds,
            sampled_texts,
        )
        return torch.stack(losses).mean()

    def _rescue(self, rollout: Rollout) -> tuple[dict[int, int], dict[str, torch.Tensor]]:
        """Fail groups with no 不通过 sample: counted, and rewritten when ``grpo.fail_rescue`` (rescue.py)."""
        g = self.grpo.num_generations
        fail_groups, blind = blind_fail_groups(rollout.texts, rollout.samples, g)
        rescued: dict[int, int] = {}
        if self.grpo.fail_rescue and blind:
            ids = self.engine.eos_token_ids
            eos = IM_END_ID if IM_END_ID in ids else ids[0]  # answers end their chat turn with <|im_end|>
            rescued = rescue_fail_groups(rollout, blind, self.engine.tokenizer, eos, self.reward_funcs, g)
        share = len(blind) / fail_groups if fail_groups else 0.0
        return rescued, {
            "fail_groups_without_fail": torch.tensor(share),
            "fail_groups_rescued": torch.tensor(float(len(rescued))),
        }

    def _loss_mask(self, rollout: Rollout, rewards: torch.Tensor, rescued: dict[int, int]) -> torch.Tensor:
        mask = rollout.completion_mask.clone()
        for row, verdict_tokens in rescued.items():  # a rewritten answer trains its verdict line only
            mask[row, verdict_tokens:] = 0
        if self.grpo.mask_truncated_completions:
            mask = mask * (~rollout.truncated).unsqueeze(1).int()
        if self.grpo.dynamic_sampling:
            flat = equal_reward_groups_mask(rewards, self.grpo.num_generations)
            mask = mask * (~flat).repeat_interleave(self.grpo.num_generations).unsqueeze(1).int()
        return mask

    @torch.no_grad()
    def _reference_and_old(
        self, prefix: PrefixState, rollout: Rollout
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ref = old = None
        if self.grpo.beta != 0.0:
            with self.model.disable_adapter():
                ref = self._logps_in_chunks(prefix, rollout)
        if self.grpo.num_iterations > 1:
            old = self._logps_in_chunks(prefix, rollout)
        return ref, old

    def _logps_in_chunks(self, prefix: PrefixState, rollout: Rollout) -> torch.Tensor:
        rows = self._micro_slices(rollout.input_ids.shape[0])
        return torch.cat([self._completion_logps(select_rows(prefix, s), rollout, s) for s in rows])

    def _completion_logps(self, prefix: PrefixState, rollout: Rollout, rows: slice) -> torch.Tensor:
        hidden = run_suffix(self.model, prefix)  # (rows, C, H): position t predicts completion token t
        return completion_logprobs(
            hidden,
            output_embedding(self.model).weight,
            rollout.completion_ids[rows],
            chunk_size=self.grpo.logprob_chunk_size,
            temperature=self.grpo.temperature,
            completion_mask=rollout.completion_mask[rows],
        )

    def _micro_slices(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.micro_batch_size, n)) for i in range(0, n, self.micro_batch_size)]

    def _optimise(
        self,
        prefix: PrefixState,
        rollout: Rollout,
        loss_mask: torch.Tensor,
        advantages: torch.Tensor,
        ref: torch.Tensor | None,
        old: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        optimizer = self.optimizers()
        slices = self._micro_slices(rollout.input_ids.shape[0])
        tokens = self.all_gather(loss_mask.sum()).sum() if self.trainer.world_size > 1 else loss_mask.sum()
        losses: list[torch.Tensor] = []
        metrics: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.grpo.num_iterations):
            for rows in slices:
                logps = self._completion_logps(select_rows(prefix, rows), rollout, rows)
                loss, step_metrics = grpo_loss(
                    logps,
                    None if old is None else old[rows],
                    None if ref is None else ref[rows],
                    advantages[rows],
                    loss_mask[rows],
                    loss_type=self.grpo.loss_type,
                    beta=self.grpo.beta,
                    epsilon_low=self.grpo.epsilon_low,
                    epsilon_high=self.grpo.resolved_epsilon_high,
                    delta=self.grpo.delta,
                    importance_sampling_level=self.grpo.importance_sampling_level,
                    num_items_in_batch=tokens,
                    max_completion_length=self.grpo.max_new_tokens,
                    num_processes=self.trainer.world_size,
                    gradient_accumulation_steps=len(slices),
                )
                self.manual_backward(loss)
                losses.append(loss.detach())
                for key, value in step_metrics.items():
                    metrics.setdefault(key, []).append(value)
            if self.max_grad_norm:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return losses, {k: torch.stack(v).nanmean() for k, v in metrics.items()}

    def _log_train(
        self,
        rollout: Rollout,
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        stats: dict[str, torch.Tensor],
        loss_metrics: dict[str, torch.Tensor],
        losses: list[torch.Tensor],
        loss_mask: torch.Tensor,
        start: float,
        gen_seconds: float,
        sampled_texts: list[str],
    ) -> None:
        lengths = rollout.completion_mask.sum(dim=1).float()
        seconds = time.perf_counter() - start
        logs = {
            "train/loss": torch.stack(losses).mean(),
            "train/reward": stats["reward"],
            "train/reward_std": stats["reward_std"],
            "train/frac_reward_zero_std": stats["frac_reward_zero_std"],
            "train/advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
            "train/completion_length/mean": lengths.mean(),
            "train/completion_length/max": lengths.max(),
            "train/truncated_fraction": rollout.truncated.float().mean(),
            "train/loss_token_fraction": loss_mask.sum() / rollout.completion_mask.sum().clamp(min=1),
            "train/tokens_per_s": torch.tensor(float(lengths.sum()) / max(seconds, 1e-9)),
            "train/generation_seconds": torch.tensor(gen_seconds),
            "train/step_seconds": torch.tensor(seconds),
            "train/fail_groups_without_fail": stats["fail_groups_without_fail"],
            "train/fail_groups_rescued": stats["fail_groups_rescued"],
        }
        for i, name in enumerate(self.reward_funcs):
            column = rollout.rewards_per_func[:, i]
            logs[f"train/rewards/{name}/mean"] = torch.nanmean(column)
            logs[f"train/rewards/{name}/std"] = column.std() if column.numel() > 1 else column.new_zeros(())
        logs.update({f"train/{k}": v for k, v in loss_metrics.items()})
        self.log_dict(
            {k: v.float() for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=len(rewards)
        )
        update_verdict_metrics(self.train_verdicts, score_outputs(rollout.samples, sampled_texts))
        self.log_dict(self.train_verdicts.compute(), on_step=True, batch_size=len(rewards))
        self.train_verdicts.reset()

    # --------------------------------------------------------------- evaluation
    def _greedy_step(self, batch: list[StageBSample], metric: VerdictMetrics) -> None:
        answers = evaluate_greedy(self.engine, batch, self.greedy, metric)
        room = self.num_table_samples - len(self._val_rows)
        self._val_rows.extend(answer.table_row() for answer in answers[: max(room, 0)])

    def validation_step(self, batch: list[StageBSample], batch_idx: int) -> None:
        self._greedy_step(batch, self.val_verdicts)

    def test_step(self, batch: list[StageBSample], batch_idx: int) -> None:
        self._greedy_step(batch, self.test_verdicts)

    def on_validation_epoch_end(self) -> None:
        self._end_eval(self.val_verdicts, "val")

    def on_test_epoch_end(self) -> None:
        self._end_eval(self.test_verdicts, "test")

    def _end_eval(self, metric: VerdictMetrics, split: str) -> None:
        self.log_dict(metric.compute())
        metric.reset()
        log_table(self.trainer, f"{split}/completions", TABLE_COLUMNS, self._val_rows)
        self._val_rows = []

    # -------------------------------------------------------------- plumbing
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self.optimizer_factory(params=params)
