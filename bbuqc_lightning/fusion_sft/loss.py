"""Assistant-token cross-entropy, per sample, without materialising logits for every position.

Only positions whose next token is an assistant token (``labels != -100`` after the shift) go through
the output projection, so a batch's ``(B, T, 151936)`` logits never exist: a Stage-B prompt of 600
tokens with a 30-token answer projects 30 rows, not 630.

The batch loss is the row-weighted token mean ``sum_i w_i * sum_t l_it / sum_i w_i * n_i``: every
assistant token counts the same (as in TRL's SFT), and a row with ``weight`` 0.5 (a conflict-marked
distilled row) counts its tokens half. Per-data-set losses are plain token means (comparable with the
validation losses, whatever the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bbuqc_lightning.fusion_sft.collator import IGNORE_INDEX


def per_sample_token_losses(
    hidden: torch.Tensor, output_weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, n_tokens)`` per row of ``labels`` (B, T) for decoder states ``hidden`` (B, T, H)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logits = hidden[:, :-1][mask] @ output_weight.T
    token_losses = F.cross_entropy(logits.float(), targets[mask], reduction="none")
    sums = token_losses.new_zeros(labels.shape[0]).index_add(0, rows, token_losses)
    counts = token_losses.new_zeros(labels.shape[0]).index_add(0, rows, torch.ones_like(token_losses))
    return sums, counts


def weighted_token_mean(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * sums) / sum(w * counts)``; 0 (with a graph) when every weight is 0."""
    weights = weights.to(sums)
    denominator = (weights * counts).sum()
    numerator = (weights * sums).sum()
    return numerator / denominator if bool(denominator > 0) else numerator * 0.0


def group_token_means(
    sums: torch.Tensor, counts: torch.Tensor, groups: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{group: (loss_sum, n_tokens)}`` over the rows of each group (detached)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in dict.fromkeys(groups):
        index = torch.tensor([i for i, g in enumerate(groups) if g == name], device=sums.device)
        out[name] = (sums.detach()[index].sum(), counts[index].sum())
    return out
