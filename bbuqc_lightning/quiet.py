"""Filters for the harmless library messages that every run would otherwise print.

Each filter names one message at its source (a ``warnings`` filter by message, a ``logging.Filter`` on
the emitting logger), so any other warning still shows; ``extras.ignore_warnings=true`` silences all.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is harmless here)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        "Using ModelCheckpoint with manual optimization",
        "GRPO steps inside training_step: a checkpoint holds the weights after that step, as resume needs",
    ),
    (
        r".*isinstance\(treespec, LeafSpec\)",
        "Lightning 2.6 calls a torch pytree API that torch 2.14 deprecated",
    ),
    (
        "You passed in a `val_dataloader` but have no `validation_step`",
        "the training-free runner has no validation loop; the shared Stage-B DataModule offers one",
    ),
    (
        r"Total length of `list` across ranks is zero",
        "a fusion file without any val_jsonl: the fusion DataModule says itself that validation is skipped",
    ),
    (
        r"Total length of `Lookahead` across ranks is zero",
        "a Stage-A rerun with every photo already written: the writer says so and merges the shards",
    ),
    (
        r"The dirpath has changed from .* therefore `best_model_score`",
        "a resumed run writes into its own new run folder (the documented resume); the experiments keep every"
        " checkpoint (save_top_k -1, no monitor), so there is no best-k state to reload",
    ),
    (
        r"`is_gradient_checkpointing` is deprecated",
        "peft 0.21 asks transformers 5 with the old name; nothing to change on our side",
    ),
    (
        r"Couldn't infer the batch indices fetched from your dataloader: `(Rebatched|Lookahead)`",
        "Stage-A's re-batched / look-ahead loader: the JSONL writer keys summaries by each item's ticket and image,"
        " not by index",
    ),
    (
        r".*returned `None`, this fit will run with no optimizer",
        "the training-free runner optimises nothing: its guidance is the state",
    ),
)
# Lightning's rank-zero info lines that advertise other products or absent hardware.
KNOWN_INFO_PREFIXES = ("💡 Tip:", "TPU available:", "HPU available:")


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Install the filters above (idempotent). Call it after Lightning is imported: ``import lightning``
    adds its own console handler, which doubles every line when the root logger (Hydra's) has one."""
    for pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropPrefixes) for f in rank_zero.filters):
        rank_zero.addFilter(_DropPrefixes(KNOWN_INFO_PREFIXES))
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
