"""The torch DataLoader pipeline: PIL decode from files (no per-rank copy of the training set in
RAM), torchvision v2 augmentation, per-sample seeds so a resumed run sees the same pixels."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_reid.data.augment import AugmentOptions, build_train_transform
from dist_reid.data.images import ImageDecodeError, load_rgb
from dist_reid.data.records import MODALITIES, Record
from dist_reid.data.sampler import IdentitySampler
from dist_reid.data.workers import ignore_stop_signals

log = logging.getLogger(__name__)


class TrainPipeline(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    # a generator: the trainer closes it on every way out, which stops the loader's workers
    def iterate(self, start_step: int = 0) -> Generator[dict[str, torch.Tensor], None, None]: ...

    def close(self) -> None:
        """Stop any worker processes now; a later ``iterate`` starts them again."""

    def __len__(self) -> int: ...


def sample_seed(seed: int, epoch: int, step: int, position: int) -> int:
    """Augmentation seed of one sample, a pure function of where it sits in the run."""
    return int(np.random.SeedSequence([seed, epoch, step, position]).generate_state(1)[0])


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps the identity sampler: yields ``(index, augmentation seed)`` lists from a start step."""

    def __init__(self, sampler: IdentitySampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.start_step = 0

    def __len__(self) -> int:
        return len(self.sampler) - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for step, batch in enumerate(self.sampler):
            if step < self.start_step:
                continue
            offset = self.sampler.rank * len(batch)
            yield [
                (index, sample_seed(self.seed, epoch, step, offset + i))
                for i, index in enumerate(batch)
            ]


class TrainImages(Dataset):
    """``dataset[(index, seed)]`` -> (augmented image, label, modality code, camera, index).

    ``skip_corrupt``: an unreadable image is replaced (counted warning) by another image of the
    same identity and modality, picked from the sample's seed; otherwise it raises
    :class:`ImageDecodeError` naming the file.
    """

    def __init__(
        self,
        records: Sequence[Record],
        labels: dict[int, int],
        height: int,
        width: int,
        augment: AugmentOptions,
        skip_corrupt: bool = False,
    ) -> None:
        self.records = list(records)
        self.labels = labels
        self.transforms = {m: build_train_transform(height, width, m, augment) for m in MODALITIES}
        self.skip_corrupt = skip_corrupt
        self.skipped = 0  # per worker process
        self.pools: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(self.records):
            self.pools.setdefault((r.pid, r.modality), []).append(i)

    def _load(self, index: int, seed: int) -> tuple[Image.Image, int]:
        """(PIL image, index actually used): the replacement rule of ``skip_corrupt``."""
        try:
            return load_rgb(self.records[index].path), index
        except ImageDecodeError as exc:
            if not self.skip_corrupt:
                raise
            error = exc
        r = self.records[index]
        pool = [i for i in self.pools[(r.pid, r.modality)] if i != index]
        rng = np.random.default_rng(seed + 1)
        for other in rng.permutation(pool):
            self.skipped += 1
            log.warning(
                "skipping corrupt image (%d so far in this worker): %s", self.skipped, error
            )
            try:
                return load_rgb(self.records[int(other)].path), int(other)
            except ImageDecodeError as exc:
                error = exc
        raise ImageDecodeError(
            f"cannot replace corrupt image {r.path}: identity {r.pid} has no other readable {r.modality} image"
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int, int]:
        index, seed = item
        image, index = self._load(index, seed)
        record = self.records[index]
        with torch.random.fork_rng(devices=[]):  # seed the transform without touching global RNG
            torch.manual_seed(seed)
            tensor = self.transforms[record.modality](image)
        return tensor, self.labels[record.pid], MODALITIES.index(record.modality), record.cam, index


class TorchTrainPipeline:
    """DataLoader over :class:`TrainImages` driven by the rank's identity sampler."""

    name = "torch"

    def __init__(
        self,
        records: Sequence[Record],
        labels: dict[int, int],
        sampler: IdentitySampler,
        *,
        height: int,
        width: int,
        augment: AugmentOptions | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
        skip_corrupt: bool = False,
    ) -> None:
        self.sampler = sampler
        self.batches = SeededBatches(sampler, seed)
        self.loader = DataLoader(
            TrainImages(records, labels, height, width, augment or AugmentOptions(), skip_corrupt),
            batch_sampler=self.batches,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
            worker_init_fn=ignore_stop_signals,  # preemption: the main process checkpoints first
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        """Stop the persistent workers now (they would otherwise live until the interpreter's
        exit, which SIGTERMs them). DataLoader has no public call for it; its iterator's own
        shutdown (what its ``__del__`` runs) is used. The next ``iterate`` starts new workers."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if iterator is not None:
            self.loader._iterator = None

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        self.batches.start_step = start_step
        for images, labels, modalities, cams, indices in self.loader:
            yield {
                "images": images,
                "labels": labels,
                "modalities": modalities,
                "cams": cams,
                "indices": indices,
            }
