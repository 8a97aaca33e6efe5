"""Stage-A summaries, the interface between Stage-A and Stage-B (SPEC §4), shared by every stage that
writes or reads them:

- :mod:`.prompts`  the image-summary prompt of a mission (texts in ``conf/prompts/stage_a.yaml``);
- :mod:`.records`  one Stage-A JSONL line per ticket: clean a generated line, build a record, normalise a read one;
- :mod:`.grammar`  the one-line summary grammar (objects, attributes, counts, remark), parsed tolerantly;
- :mod:`.scoring`  object-level scoring of generated summaries against reference ones (``stage_a/object_f1``).

The Stage-A *stage* (predict loop, DataModule, settings record) is :mod:`bbuqc_lightning.stage_a`.
"""
