"""The torch DataLoader pipeline: PIL decode from files (no per-rank copy of the training set in
RAM), torchvision v2 augmentation, per-sample seeds so a resumed run sees the same pixels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_reid.data.augment import AugmentOptions, build_train_transform
from dist_reid.data.images import load_rgb
from dist_reid.data.records import MODALITIES, Record
from dist_reid.data.sampler import ModalityBalancedSampler


class TrainPipeline(Protocol):
    def set_epoch(self, epoch: int) -> None: ...
    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]: ...
    def __len__(self) -> int: ...


def sample_seed(seed: int, epoch: int, step: int, position: int) -> int:
    """Augmentation seed of one sample, a pure function of where it sits in the run."""
    return int(np.random.SeedSequence([seed, epoch, step, position]).generate_state(1)[0])


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps the identity sampler: yields ``(index, augmentation seed)`` lists from a start step."""

    def __init__(self, sampler: ModalityBalancedSampler, seed: int) -> None:
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
            yield [(index, sample_seed(self.seed, epoch, step, offset + i)) for i, index in enumerate(batch)]


class TrainImages(Dataset):
    """``dataset[(index, seed)]`` -> (augmented image, label, modality code, camera, index)."""

    def __init__(self, records: Sequence[Record], labels: dict[int, int], height: int, width: int, augment: AugmentOptions) -> None:
        self.records = list(records)
        self.labels = labels
        self.transforms = {m: build_train_transform(height, width, m, augment) for m in MODALITIES}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int, int]:
        index, seed = item
        record = self.records[index]
        image = load_rgb(record.path)
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
        sampler: ModalityBalancedSampler,
        *,
        height: int,
        width: int,
        augment: AugmentOptions = AugmentOptions(),
        num_workers: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        self.sampler = sampler
        self.batches = SeededBatches(sampler, seed)
        self.loader = DataLoader(
            TrainImages(records, labels, height, width, augment),
            batch_sampler=self.batches,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        self.batches.start_step = start_step
        for images, labels, modalities, cams, indices in self.loader:
            yield {"images": images, "labels": labels, "modalities": modalities, "cams": cams, "indices": indices}
