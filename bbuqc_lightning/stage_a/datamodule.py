"""Stage-A DataModule: the SPEC §3 image tree -> batches of (image, mission prompt) with group metadata.

Each dataset item is one image of one group. Batches carry ``meta`` (per image: ``ticket_key``,
``image_index`` (0-based), ``num_images``, ``record``) for the JSONL writer callback, which assembles a
group's line once all its images are summarised. Under DDP every rank gets whole groups (a group is never
split across ranks), so each rank can complete and write its own groups; run with
``use_distributed_sampler=False`` (the stage_a experiment sets it).

The groups still to do (not yet in the output) are split across ranks when the dataloader is built, after
the writer has filled :attr:`StageADataModule.skip_ticket_keys`: a resumed DDP run shares the remaining
work evenly, and a rank left with nothing (everything done, or fewer groups than ranks) gets an empty
dataloader, which Lightning accepts (``allow_zero_length_dataloader_with_multiple_devices``) and the
writer and module handle (their cross-rank steps run in ``teardown``, which every rank reaches).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bbuqc_lightning.data.images import load_image, validate_group_images
from bbuqc_lightning.data.photo_tree import PhotoTreeDataModule
from bbuqc_lightning.data.tree import GroupRecord, scan_tree, shown
from bbuqc_lightning.generation.engine import PromptEncoder
from bbuqc_lightning.summaries.prompts import image_conversation, stage_a_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    record: GroupRecord
    image_index: int


class StageAImages(Dataset):
    """Images of the groups to summarise, group by group, in image order.

    With an ``encoder`` each item carries ``prompt``, the engine's tensors for its conversation, instead of
    ``image``: the chat template, tokenizer and image processor then run in the DataLoader's workers, beside
    the GPU's generation, and the decoded photo does not travel to the main process a second time (shipping
    both took ~13 s more per 256 photos than shipping the prompt alone, measured on 2 cores)."""

    def __init__(
        self,
        items: list[ImageItem],
        prompts: dict,
        min_pixels: int,
        max_pixels: int,
        encoder: PromptEncoder | None = None,
    ) -> None:
        self.items = items
        self.prompts = prompts
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        path = item.record.image_paths[item.image_index]
        image = load_image(path, self.min_pixels, self.max_pixels)
        conversation = image_conversation(stage_a_prompt(self.prompts, item.record.mission))
        out = {
            "conversation": conversation,
            "meta": {
                "ticket_key": item.record.ticket_key,
                "image_index": item.image_index,
                "num_images": len(item.record.image_paths),
                "record": item.record,
            },
        }
        if self.encoder is not None:
            out["prompt"] = self.encoder(conversation, [image])
        else:
            out["image"] = image
        return out


def collate_images(items: list[dict[str, Any]]) -> dict[str, list]:
    """Keep PIL images (or encoded prompts), conversations and metadata as lists: the engine batches prompts."""
    return {
        key: [item[key] for item in items]
        for key in ("image", "conversation", "meta", "prompt")
        if key in items[0]
    }


class Rebatched:
    """Batches of ``batch_size`` items made from a DataLoader's smaller batches (lists concatenated, in order).

    A DataLoader worker builds a whole batch alone: with the engine's 256-photo batches, the first one waited
    for one worker to decode and encode 256 photos (27 s of a 132 s run on an H100 machine). Loading in
    units of ``data.load_batch_size`` spreads each engine batch over every worker. torchdata's ``Batcher``
    node does this over its own loader stack; this is the few lines needed on a plain DataLoader.
    """

    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        self.loader = loader
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.loader.dataset) // self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, list]]:
        pending: dict[str, list] = {}
        for part in self.loader:
            for key, values in part.items():
                pending.setdefault(key, []).extend(values)
            while _batch_len(pending) >= self.batch_size:
                yield {key: values[: self.batch_size] for key, values in pending.items()}
                pending = {key: values[self.batch_size :] for key, values in pending.items()}
        if _batch_len(pending):
            yield pending


class Lookahead:
    """Each batch also carries the next one's encoded prompts and metadata as ``batch["ahead"]`` (the last batch
    none), so Stage-A hands them to the engine early (:class:`~bbuqc_lightning.generation.engine.Ahead`): the next
    batch's photos take the slots the current batch's last summaries leave, instead of each ``generate`` call ending
    in a wave of rows waiting for its longest summary. The batches and their order are unchanged (the writer still
    receives each batch's own summaries); one more batch of encoded photos is held in host memory (~2 GB a rank at
    256 photos of the 4B preset's size).
    """

    def __init__(self, loader: Iterable[dict[str, list]]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, list]]:
        previous = None
        for batch in self.loader:
            if previous is not None:
                yield {**previous, "ahead": {"prompt": batch["prompt"], "meta": batch["meta"]}}
            previous = batch
        if previous is not None:
            yield previous


def _batch_len(batch: dict[str, list]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def photo_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    load_batch_size: int,
    collate_fn: Callable[[list[Any]], dict[str, list]],
    encoded: bool,
    lookahead: bool = False,
) -> DataLoader | Rebatched | Lookahead:
    """Batches of ``batch_size`` photos in order: with workers, each loads ``load_batch_size`` at a time and the
    units are re-batched (:class:`Rebatched`); ``encoded`` items are large (~8 MB a photo in bf16), so about two
    batches are in flight in all. ``lookahead`` (encoded items only): each batch carries the next one's prompts
    (:class:`Lookahead`)."""
    unit = min(load_batch_size, batch_size) if num_workers else batch_size
    prefetch = None
    if num_workers:
        prefetch = max(1, -(-2 * batch_size // (unit * num_workers))) if encoded else 2
    loader = DataLoader(
        dataset,
        batch_size=unit,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        prefetch_factor=prefetch,
    )
    batches = loader if unit == batch_size else Rebatched(loader, batch_size)
    return Lookahead(batches) if lookahead and encoded else batches


class StageADataModule(PhotoTreeDataModule):
    """Scans ``root`` (generating the synthetic tree first when ``synthetic`` is set and it is missing).

    ``load_batch_size``: photos a DataLoader worker loads (and encodes) at a time, re-batched to ``batch_size``
    (the engine's call) in order; with ``num_workers=0`` the loader makes whole batches itself. ``lookahead``:
    each batch of encoded prompts carries the next one's, which the engine starts early (:class:`Lookahead`).
    """

    def __init__(self, *args: Any, load_batch_size: int = 32, lookahead: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if load_batch_size < 1:
            raise ValueError(f"data.load_batch_size must be >= 1, got {load_batch_size}")
        self.load_batch_size = load_batch_size
        self.lookahead = lookahead
        # Filled by the JSONL writer callback on resume: groups already in the output file.
        self.skip_ticket_keys: set[str] = set()
        # Under DDP a rank may have no group left to do: an empty dataloader is fine (see module docstring).
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.scanned: list[GroupRecord] = []  # every group of the tree (same on every rank)
        self.records: list[GroupRecord] = []  # this rank's groups to summarise in this run (valid images)
        # (path, reason) of groups skipped with strict=false: the scan's (the same on every rank) first,
        # then this rank's groups with a bad image. `scan_skipped` counts the former.
        self.skipped: list[tuple[str, str]] = []
        self.scan_skipped = 0
        self.dataset: StageAImages | None = None

    def setup(self, stage: str | None = None) -> None:
        scan = scan_tree(self.root, strict=self.strict)
        self.scanned = scan.records
        self.skipped = [(shown(s.path), s.reason) for s in scan.skipped]
        self.scan_skipped = len(self.skipped)
        log.info("Stage-A: %d groups scanned, %d folders skipped", len(scan.records), len(self.skipped))

    def _valid_records(self, records: list[GroupRecord]) -> list[GroupRecord]:
        """``records`` whose every image loads. Strict: raise for the first bad group (in tree order).
        Non-strict: skip each bad group whole, named and counted.

        The groups are checked on one thread per CPU core (Pillow decodes and resizes without holding the
        GIL: 2.1x on 2 cores for 4000x3000 photos), before the DataLoader's workers start; the outcome and
        its order are those of a sequential pass."""

        def error(record: GroupRecord) -> ValueError | None:
            try:
                validate_group_images(record, self.min_pixels, self.max_pixels)
            except ValueError as err:
                return err
            return None

        threads = min(len(records), os.cpu_count() or 1, 32)
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="stage-a-check") as pool:
                errors: Iterable[ValueError | None] = list(pool.map(error, records))
        else:
            errors = map(error, records)  # lazily: strict stops at the first bad group
        ok = []
        for record, err in zip(records, errors, strict=True):
            if err is None:
                ok.append(record)
                continue
            if self.strict:
                raise err
            log.warning("skipping: %s", err)
            self.skipped.append((str(record.folders[0]) if record.folders else record.ticket_key, str(err)))
        return ok

    def _this_rank(self, records: list[GroupRecord]) -> list[GroupRecord]:
        trainer = self.trainer if self._trainer_attached() else None
        if trainer is None or trainer.world_size == 1:
            return records
        return records[trainer.global_rank :: trainer.world_size]

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def predict_dataloader(self) -> DataLoader | Rebatched | Lookahead:
        # Built after every setup hook, so the writer callback has filled skip_ticket_keys (resume). Only the
        # groups still to do are split across ranks, then this rank's are validated (images decoded once).
        todo = [r for r in self.scanned if r.ticket_key not in self.skip_ticket_keys]
        del self.skipped[self.scan_skipped :]  # a second call must not count this rank's skips twice
        self.records = self._valid_records(self._this_rank(todo))
        items = [ImageItem(r, i) for r in self.records for i in range(len(r.image_paths))]
        log.info(
            "Stage-A: %d groups already written, %d to do; this rank: %d groups / %d images to summarise "
            "(%d skipped)",
            len(self.scanned) - len(todo),
            len(todo),
            len(self.records),
            len(items),
            len(self.skipped) - self.scan_skipped,
        )
        encoder = None
        if self.processor is not None:
            encoder = PromptEncoder(self.processor, pixel_dtype=self.pixel_dtype)
        self.dataset = StageAImages(items, self.prompts, self.min_pixels, self.max_pixels, encoder)
        return photo_loader(
            self.dataset,
            self.batch_size,
            self.num_workers,
            self.load_batch_size,
            collate_images,
            encoded=encoder is not None,
            lookahead=self.lookahead,
        )
