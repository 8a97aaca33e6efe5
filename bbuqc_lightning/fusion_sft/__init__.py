"""Fusion SFT (SPEC §9): DataModule, collator, loss and LightningModule (``+experiment=fusion_sft``)."""
