"""Modality-balanced identity sampler, distributed and world-size invariant.

One global plan per (seed, epoch) — P identities x (K visible + K infrared) per batch, as the
reference's ``IdentitySampler`` draws them (protocols.md section 5) — computed identically on
every rank; rank r takes the identity slice ``[r*P/W, (r+1)*P/W)`` of each batch, so each local
batch is identity-complete and batch-local losses (centers, hard mining, CPM) need no all-gather
(architecture decision 4).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MODALITY_ORDER = ("visible", "infrared")


class ModalityBalancedSampler(Sampler[list[int]]):
    """Batch sampler yielding lists of dataset indices.

    Layout of every (global and local) batch: all visible images first, then all infrared; the
    same identity order in both halves; the K images of an identity contiguous. Identities are
    drawn uniformly without replacement within a batch (batches are independent, as in the
    reference); images without replacement when an identity has at least K of a modality, with
    replacement otherwise. An epoch has ``max(#visible, #infrared) // (P*K) + 1`` batches, the
    number the reference actually yields (protocols.md pitfall 15), on every rank.
    """

    def __init__(
        self,
        pids: Sequence[int],
        modalities: Sequence[str],
        ids_per_batch: int,
        instances_per_modality: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if len(pids) != len(modalities):
            raise ValueError(f"pids ({len(pids)}) and modalities ({len(modalities)}) differ in length")
        bad = sorted({m for m in modalities if m not in MODALITY_ORDER})
        if bad:
            raise ValueError(f"modalities must be 'visible' or 'infrared', got {bad[:3]}")
        if ids_per_batch < 1 or instances_per_modality < 1:
            raise ValueError(
                f"ids_per_batch ({ids_per_batch}) and instances_per_modality ({instances_per_modality}) must be >= 1"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if ids_per_batch % num_replicas:
            raise ValueError(
                f"ids_per_batch={ids_per_batch} is not divisible by the world size {num_replicas}: "
                "every rank needs whole identities"
            )
        self.ids_per_batch = ids_per_batch
        self.instances = instances_per_modality
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        pid_array = np.asarray(pids)
        modality_array = np.asarray(modalities)
        by_identity: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for pid in np.unique(pid_array):
            members = pid_array == pid
            visible = np.flatnonzero(members & (modality_array == "visible"))
            infrared = np.flatnonzero(members & (modality_array == "infrared"))
            if len(visible) and len(infrared):
                by_identity[int(pid)] = (visible, infrared)
        if len(by_identity) < ids_per_batch:
            raise ValueError(
                f"only {len(by_identity)} identities have both visible and infrared images; "
                f"ids_per_batch={ids_per_batch} needs at least that many"
            )
        self.identities = sorted(by_identity)
        self._indices = [by_identity[pid] for pid in self.identities]
        largest = max(int((modality_array == m).sum()) for m in MODALITY_ORDER)
        self.num_batches = largest // (ids_per_batch * instances_per_modality) + 1

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically: the plan is a function of (seed, epoch) only."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _draw(self, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
        replace = len(pool) < self.instances
        return rng.choice(pool, size=self.instances, replace=replace)

    def global_batches(self) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        """The plan every rank shares: per batch, (identity, K visible, K infrared) triples."""
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.identities), size=self.ids_per_batch, replace=False)
            batch = []
            for slot in chosen:
                visible, infrared = self._indices[slot]
                batch.append((self.identities[slot], self._draw(rng, visible), self._draw(rng, infrared)))
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.ids_per_batch // self.num_replicas
        start = self.rank * per_rank
        for batch in self.global_batches():
            mine = batch[start : start + per_rank]
            yield [int(i) for _, vis, _ in mine for i in vis] + [int(i) for _, _, ir in mine for i in ir]
