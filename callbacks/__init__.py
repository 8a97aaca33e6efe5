"""Lightning callbacks of the project, imported as ``bbuqc_lightning.callbacks.<module>`` (this folder is
installed under the package's name; nothing named ``callbacks`` is installed on its own):

- ``stage_a_writer``      Stage-A JSONL, one line per ticket, streamed and resumable;
- ``stage_a_eval``        scores the written summaries against references at the end of a Stage-A run;
- ``adapter_checkpoint``  saves the peft LoRA adapter (and how to rebuild its base) of GRPO / fusion SFT;
- ``model_folder``        saves a fully fine-tuned model as one ``from_pretrained`` folder;
- ``distillation``        Teacher distillation: the final rollout's answers as ``distill_chatml.jsonl``;
- ``lr_monitor``, ``progress_bar``  Lightning's own, made quiet under ``logger=none`` and bounded by ``max_steps``.
"""
