"""What the DataModules over a SPEC §3 photo tree share (Stage-A, end-to-end evaluation).

Both scan ``root`` (the synthetic tree, generated on first use when ``synthetic`` is set and ``root`` is
missing), load photos within one pixel window, and keep PIL images, records and encoded prompts on the host:
the generation engine moves the tensors itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class PhotoTreeDataModule(L.LightningDataModule):
    """``root``, the mission prompts and the photo settings of a photo-tree loop; subclasses add the loaders."""

    def __init__(
        self,
        root: str,
        prompts: dict,
        processor: Any = None,
        strict: bool = True,
        batch_size: int = 4,
        num_workers: int = 0,
        min_pixels: int = 4096,
        max_pixels: int = 786432,
        synthetic: dict | None = None,
        pixel_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.prompts = prompts
        self.processor = processor  # Stage-A encodes prompts with it in the DataLoader's workers
        self.strict = strict
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.synthetic = synthetic
        self.pixel_dtype = pixel_dtype  # encoded pixel values in the model's dtype (host memory)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """PIL images and records stay on the host; the generation engine moves the encoded tensors."""
        return batch

    def prepare_data(self) -> None:
        if self.synthetic and not self.root.exists():
            from bbuqc_lightning.data.synthetic.tree import ensure_synthetic

            ensure_synthetic(**self.synthetic)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} is not a folder (see README: data layout)")
