"""Fusion data: the ratio-weighted mix of named data sets behind the fusion SFT (SPEC §9).

- :mod:`.config`  reads a fusion YAML (``targets`` / ``sources`` / ``extends``) and validates it;
- :mod:`.rows`    turns one entry's JSONL rows (``dataset: bbu`` or ``dataset: chat``) into chat samples;
- :mod:`.sampler` draws each epoch's quotas, seeded by ``(seed, epoch)``, DDP-sliced and resumable;
- :mod:`.synthetic_sources` derives all four kinds of JSONL from the synthetic data set (the demo).

The Lightning pieces (DataModule, collator, module) live in :mod:`bbuqc_lightning.sft`.
"""
