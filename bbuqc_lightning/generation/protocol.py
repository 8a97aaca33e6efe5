"""What a stage needs from a generator: :class:`~bbuqc_lightning.generation.engine.GenerationEngine`, the
OpenAI-compatible HTTP engine, or a scripted test double: one ``generate`` method."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from bbuqc_lightning.generation.sampling import Completion, SamplingParams
from bbuqc_lightning.generation.scheduler import PromptTooLongError


class Engine(Protocol):
    """``generate(conversations, params) -> [[Completion] * params.num_return_sequences] * len(conversations)``."""

    def generate(
        self, conversations: Sequence[Sequence[dict]], params: SamplingParams
    ) -> list[list[Completion]]: ...


@contextmanager
def naming_prompts(names: Sequence[str]) -> Iterator[None]:
    """Re-raise a too-long prompt with its name (the ticket key) for engines that only know its index."""
    try:
        yield
    except PromptTooLongError as err:
        raise PromptTooLongError(str(err).replace(f"#{err.index}", names[err.index], 1), err.index) from None
