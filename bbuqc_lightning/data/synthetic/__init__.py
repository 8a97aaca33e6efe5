"""The synthetic BBU-QC data set: what tests, demos and smoke runs train and evaluate on.

- :mod:`.scenes`  the SPEC §2 rules and the scene model: groups, their reference summaries and labels;
- :mod:`.render`  draws each photo from its scene, so pixels and summary never disagree;
- :mod:`.tree`    writes the SPEC §3 image tree and the reference Stage-A JSONL (``ensure_synthetic`` on
  first use; ``tools/make_synthetic.py`` is the command line).

The fusion SFT demo's source files are derived from it by
:mod:`bbuqc_lightning.fusion_sft.synthetic_sources`, the rule-derived Stage-B answers by
:mod:`bbuqc_lightning.stage_b.reference_answers`.
"""
