"""End-to-end DataModule: the SPEC §3 image tree -> batches of whole tickets (every photo loaded).

One item is one ticket: its :class:`~bbuqc_lightning.data.tree.GroupRecord`, its photos (EXIF-rotated,
resized within the pixel budget) and the mission's Stage-A conversation. Whole tickets, because the
verdict is a ticket's: the module summarises every photo of a batch in one generation call, then asks
for the verdicts of the same tickets.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bbuqc_lightning.data.images import load_image
from bbuqc_lightning.data.photo_tree import PhotoTreeDataModule
from bbuqc_lightning.data.tree import GroupRecord, scan_tree
from bbuqc_lightning.summaries.prompts import image_conversation, stage_a_prompt

log = logging.getLogger(__name__)


class TicketPhotos(Dataset):
    """Tickets with their photos and Stage-A conversation (one per photo, the mission's prompt)."""

    def __init__(self, records: list[GroupRecord], prompts: dict, min_pixels: int, max_pixels: int) -> None:
        self.records = records
        self.prompts = prompts
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        images = [load_image(p, self.min_pixels, self.max_pixels) for p in record.image_paths]
        return {
            "record": record,
            "images": images,
            "conversation": image_conversation(stage_a_prompt(self.prompts, record.mission)),
        }


def collate_tickets(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tickets stay a list: PIL images and records go to the generation engine as they are."""
    return items


class E2EDataModule(PhotoTreeDataModule):
    """Scans ``root`` (the synthetic test tree by default, generated on first use) for the test loop."""

    def __init__(self, *args: Any, limit_groups: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_groups = limit_groups
        self.records: list[GroupRecord] = []
        self.skipped: list[tuple[str, str]] = []

    def setup(self, stage: str | None = None) -> None:
        scan = scan_tree(self.root, strict=self.strict)
        self.records = scan.records[: self.limit_groups] if self.limit_groups else scan.records
        self.skipped = [(str(s.path), s.reason) for s in scan.skipped]
        log.info(
            "end to end: %d tickets from %s (%d skipped)", len(self.records), self.root, len(self.skipped)
        )

    def test_dataloader(self) -> DataLoader:
        dataset = TicketPhotos(self.records, self.prompts, self.min_pixels, self.max_pixels)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_tickets,
        )
