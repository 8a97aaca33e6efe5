"""Greedy verdict evaluation of Stage-B samples, shared by GRPO validation/test and ``+experiment=eval``.

One batch: the engine answers every sample greedily (:func:`generate_greedy`), each answer is parsed
against the SPEC §5 contract with the group's own summaries (:func:`score_outputs`, so the no-copy rule
applies), and the parsed verdicts feed a :class:`~bbuqc_lightning.stage_b.metrics.VerdictMetrics`
(:func:`update_verdict_metrics`). :func:`evaluate_greedy` chains the three.

Keeping the chain here means GRPO's ``val/*`` and the eval run's ``test/*`` numbers come from the same
code, so they can be compared.

Example::

    answers = evaluate_greedy(engine, batch, SamplingParams(max_new_tokens=128), VerdictMetrics("val/"))
    answers[0].verdict, answers[0].valid, answers[0].error
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bbuqc_lightning.constants import image_key
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.generation.protocol import naming_prompts
from bbuqc_lightning.stage_b.contract import parse_verdict
from bbuqc_lightning.stage_b.metrics import VerdictMetrics
from bbuqc_lightning.stage_b.sample import StageBSample

# The short sample table GRPO logs for val/test (one row per answer).
TABLE_COLUMNS: tuple[str, ...] = ("ticket_key", "mission", "label", "output", "verdict", "valid")


@dataclass(frozen=True)
class ScoredAnswer:
    """One group's answer with its parsed verdict (``verdict`` is ``"pass"``/``"fail"``/``None``)."""

    ticket_key: str
    group_id: str
    mission: str
    label: str | None
    summaries: list[str]
    output: str
    verdict: str | None
    reason: str | None
    valid: bool
    error: str | None
    truncated: bool = False  # the answer hit max_new_tokens (an invalid answer's likely cause)

    def table_row(self, columns: Sequence[str] = TABLE_COLUMNS) -> list[Any]:
        """The values of ``columns`` (field names) for a W&B table."""
        values = asdict(self)
        return [values[c] for c in columns]


def score_outputs(
    samples: Sequence[StageBSample], outputs: Sequence[str], truncated: Sequence[bool] | None = None
) -> list[ScoredAnswer]:
    """Parse each output against its sample (as built by ``stage_b.builder``).

    >>> s = StageBSample([], "QC-A-20250101-1", "QC-A-20250101-1::fail", "BBU接地线检查", "fail", ["电线/分布散乱×1"])
    >>> score_outputs([s], ["不通过\\n理由: 图片_1电线分布散乱。"])[0].verdict
    'fail'
    """
    if len(samples) != len(outputs):
        raise ValueError(f"{len(samples)} samples but {len(outputs)} outputs")
    flags = list(truncated) if truncated is not None else [False] * len(outputs)
    answers = []
    for sample, text, cut in zip(samples, outputs, flags, strict=True):
        summaries = list(sample.summaries)
        parsed = parse_verdict(text, summaries)
        answers.append(
            ScoredAnswer(
                ticket_key=sample.ticket_key,
                group_id=sample.group_id,
                mission=sample.mission,
                label=sample.label,
                summaries=summaries,
                output=text,
                verdict=parsed.verdict,
                reason=parsed.reason,
                valid=parsed.valid,
                error=parsed.error,
                truncated=bool(cut),
            )
        )
    return answers


def update_verdict_metrics(metric: VerdictMetrics, answers: Sequence[ScoredAnswer]) -> None:
    """Add ``answers`` to the running verdict counts."""
    metric.update(
        [a.verdict for a in answers],
        [a.label for a in answers],
        [a.mission for a in answers],
        [a.valid for a in answers],
    )


def generate_greedy(
    engine: GenerationEngine, samples: Sequence[StageBSample], params: SamplingParams
) -> tuple[list[str], list[bool]]:
    """One answer per sample through the shared engine: ``(texts, truncated flags)``."""
    with naming_prompts([s.ticket_key for s in samples]):
        outputs = engine.generate([s.messages for s in samples], params)
    return [out[0].text for out in outputs], [out[0].truncated for out in outputs]


def evaluate_greedy(
    engine: GenerationEngine,
    samples: Sequence[StageBSample],
    params: SamplingParams,
    metric: VerdictMetrics | None = None,
) -> list[ScoredAnswer]:
    """Generate, parse and (when ``metric`` is given) count one batch of samples."""
    texts, truncated = generate_greedy(engine, samples, params)
    answers = score_outputs(samples, texts, truncated)
    if metric is not None:
        update_verdict_metrics(metric, answers)
    return answers


def summaries_text(summaries: Sequence[str]) -> str:
    """``图片_1: …`` lines, as the prompt shows them (for tables a person reads).

    >>> summaries_text(["无关图片", "电线/捆扎整齐×1"])
    '图片_1: 无关图片\\n图片_2: 电线/捆扎整齐×1'
    """
    return "\n".join(f"{image_key(i)}: {s}" for i, s in enumerate(summaries, start=1))
