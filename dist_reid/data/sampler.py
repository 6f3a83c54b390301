"""Identity samplers, distributed and world-size invariant.

Both samplers compute one global plan per (seed, epoch) identically on every rank; rank r takes
the identity slice ``[r*P/W, (r+1)*P/W)`` of each batch, so each local batch is identity-complete
and batch-local losses (centers, hard mining, CPM) need no all-gather (architecture decision 4).

* :class:`ModalityBalancedSampler` (``data.sampler: modality_balanced``): P identities x (K
  visible + K infrared) per batch, as AGW's ``IdentitySampler`` draws them (protocols.md
  section 5); the AGW family and PDM train with it.
* :class:`IdentityModalitySampler` (``data.sampler: identity_modality``): MIP's epoch, which
  walks every identity's images in chunks of K per modality, so identities appear in proportion
  to their image count; infrared half first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MODALITY_ORDER = ("visible", "infrared")
REPLACEMENT = ("always", "when_short")
SAMPLERS = ("modality_balanced", "identity_modality")
REMAINDER = ("drop", "pad")


def _group(
    pids: Sequence[int], modalities: Sequence[str]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """identity -> (visible indices, infrared indices), identities having both modalities only."""
    if len(pids) != len(modalities):
        raise ValueError(f"pids ({len(pids)}) and modalities ({len(modalities)}) differ in length")
    bad = sorted({m for m in modalities if m not in MODALITY_ORDER})
    if bad:
        raise ValueError(f"modalities must be 'visible' or 'infrared', got {bad[:3]}")
    pid_array = np.asarray(pids)
    modality_array = np.asarray(modalities)
    by_identity: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for pid in np.unique(pid_array):
        members = pid_array == pid
        visible = np.flatnonzero(members & (modality_array == "visible"))
        infrared = np.flatnonzero(members & (modality_array == "infrared"))
        if len(visible) and len(infrared):
            by_identity[int(pid)] = (visible, infrared)
    return by_identity


def _check_shape(
    ids_per_batch: int, instances: int, num_replicas: int, rank: int, available: int
) -> None:
    if ids_per_batch < 1 or instances < 1:
        raise ValueError(
            f"ids_per_batch ({ids_per_batch}) and instances_per_modality ({instances}) must be >= 1"
        )
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
    if ids_per_batch % num_replicas:
        raise ValueError(
            f"ids_per_batch={ids_per_batch} is not divisible by the world size {num_replicas}: "
            "every rank needs whole identities"
        )
    if available < ids_per_batch:
        raise ValueError(
            f"only {available} identities have both visible and infrared images; "
            f"ids_per_batch={ids_per_batch} needs at least that many"
        )


class _PlannedIdentitySampler(Sampler[list[int]]):
    """What both samplers share: identity-grouped indices, a plan that is a function of
    (seed, epoch) only, and rank r's slice ``[r*P/W, (r+1)*P/W)`` of every global batch."""

    infrared_first = False  # which modality's half comes first in a batch

    def __init__(
        self,
        pids: Sequence[int],
        modalities: Sequence[str],
        ids_per_batch: int,
        instances_per_modality: int,
        num_replicas: int,
        rank: int,
        seed: int,
    ) -> None:
        by_identity = _group(pids, modalities)
        _check_shape(ids_per_batch, instances_per_modality, num_replicas, rank, len(by_identity))
        self.ids_per_batch = ids_per_batch
        self.instances = instances_per_modality
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.identities = sorted(by_identity)
        self._indices = [by_identity[pid] for pid in self.identities]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically: the plan is a function of (seed, epoch) only."""
        self.epoch = epoch

    def global_batches(self) -> Iterable[list[tuple[int, np.ndarray, np.ndarray]]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.ids_per_batch // self.num_replicas
        start = self.rank * per_rank
        for batch in self.global_batches():
            mine = batch[start : start + per_rank]
            visible = [int(i) for _, vis, _ in mine for i in vis]
            infrared = [int(i) for _, _, ir in mine for i in ir]
            yield infrared + visible if self.infrared_first else visible + infrared


class ModalityBalancedSampler(_PlannedIdentitySampler):
    """Batch sampler yielding lists of dataset indices.

    Layout of every (global and local) batch: all visible images first, then all infrared; the
    same identity order in both halves; the K images of an identity contiguous. Identities are
    drawn uniformly without replacement within a batch (batches are independent, as in the
    reference). ``replacement``: ``"always"`` draws an identity's K images of a modality with
    replacement, as the released ``IdentitySampler`` does (``np.random.choice(pos, K)``), so an
    identity may show the same image twice even when it has K or more; ``"when_short"`` draws
    without replacement unless the identity has fewer than K of that modality. An epoch has ``max(#visible, #infrared) // (P*K) + 1`` batches, the
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
        replacement: str = "when_short",
    ) -> None:
        if replacement not in REPLACEMENT:
            raise ValueError(f"replacement must be one of {REPLACEMENT}, got {replacement!r}")
        super().__init__(
            pids, modalities, ids_per_batch, instances_per_modality, num_replicas, rank, seed
        )
        self.replacement = replacement
        modality_array = np.asarray(modalities)
        largest = max(int((modality_array == m).sum()) for m in MODALITY_ORDER)
        self.num_batches = largest // (ids_per_batch * instances_per_modality) + 1

    def __len__(self) -> int:
        return self.num_batches

    def _draw(self, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
        replace = self.replacement == "always" or len(pool) < self.instances
        return rng.choice(pool, size=self.instances, replace=replace)

    def global_batches(self) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        """The plan every rank shares: per batch, (identity, K visible, K infrared) triples."""
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.identities), size=self.ids_per_batch, replace=False)
            batch = []
            for slot in chosen:
                visible, infrared = self._indices[slot]
                batch.append(
                    (self.identities[slot], self._draw(rng, visible), self._draw(rng, infrared))
                )
            yield batch


class IdentityModalitySampler(_PlannedIdentitySampler):
    """MIP's epoch (its released ``RandomIdentityModalitySampler``), distributed.

    Per identity, each modality's images are shuffled and cut into chunks of K
    (``instances_per_modality``); a modality with fewer than K images, or fewer than the other
    modality, is topped up by draws with replacement from itself, so both modalities give the
    same number of chunks and a remainder below K is dropped. Each batch takes P identities
    uniformly among those with chunks left and consumes one infrared and one visible chunk of
    each; the epoch ends when fewer than P identities have chunks left. Every image is therefore
    used at most once per epoch (top-ups aside), and an identity appears in as many batches as
    it has chunks: in proportion to its image count, unlike :class:`ModalityBalancedSampler`.

    Layout of every (global and local) batch: all infrared images first (the released order),
    then all visible; the same identity order in both halves; an identity's K images contiguous.
    The batch count depends on the draw, so ``len()`` builds the epoch's plan (same on every rank).

    ``remainder``: ``"drop"`` (the released SYSU branch) drops the last ``n % K`` images as
    described; ``"pad"`` (the released RegDB branch) first tops both modalities up by
    ``K - n_visible % K`` draws with replacement (a whole extra chunk when K divides it), so no
    image is dropped (RegDB, 10 + 10 images, K = 4: 3 chunks per identity instead of 2).
    """

    infrared_first = True  # the released order

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
        remainder: str = "drop",
    ) -> None:
        if remainder not in REMAINDER:
            raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")
        super().__init__(
            pids, modalities, ids_per_batch, instances_per_modality, num_replicas, rank, seed
        )
        self.remainder = remainder
        self._plan: tuple[int, list[list[tuple[int, np.ndarray, np.ndarray]]]] | None = None

    def _chunks(self, rng: np.random.Generator, visible: np.ndarray, infrared: np.ndarray):
        k = self.instances
        pools = []
        for pool in (visible, infrared):
            # released RegDB branch: both top-ups sized from the visible count
            extra = k - len(visible) % k if self.remainder == "pad" else max(0, k - len(pool))
            if extra:
                pool = np.concatenate([pool, rng.choice(pool, size=extra, replace=True)])
            pools.append(pool)
        longest = max(len(p) for p in pools)
        pools = [
            np.concatenate([p, rng.choice(p, size=longest - len(p), replace=True)]) for p in pools
        ]
        n = longest // k
        vis, ir = (rng.permutation(p)[: n * k].reshape(n, k) for p in pools)
        return vis, ir

    def global_batches(self) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
        """The plan every rank shares: per batch, (identity, K visible, K infrared) triples."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = [self._chunks(rng, vis, ir) for vis, ir in self._indices]
        used = [0] * len(chunks)
        available = list(range(len(chunks)))
        plan = []
        while len(available) >= self.ids_per_batch:
            chosen = rng.choice(len(available), size=self.ids_per_batch, replace=False)
            slots = [available[c] for c in chosen]
            batch = []
            for slot in slots:
                vis, ir = chunks[slot]
                batch.append((self.identities[slot], vis[used[slot]], ir[used[slot]]))
                used[slot] += 1
            available = [s for s in available if used[s] < len(chunks[s][0])]
            plan.append(batch)
        self._plan = (self.epoch, plan)
        return plan

    def __len__(self) -> int:
        return len(self.global_batches())


IdentitySampler = ModalityBalancedSampler | IdentityModalitySampler
# Batch-local hard mining needs another identity on the same rank: with one per rank the
# triplet loss has no negative and is silently zero (architecture decision 4: no all-gather).
MIN_IDS_PER_RANK = 2


def check_ids_per_rank(
    ids_per_batch: int, num_replicas: int, minimum: int = MIN_IDS_PER_RANK
) -> None:
    """Refuse a global batch of ``ids_per_batch`` identities that leaves a rank fewer than
    ``minimum``; the message says how to scale it with the world size. Needs no data, so a
    caller can check before reading any."""
    per_rank = ids_per_batch // max(num_replicas, 1)
    if per_rank < minimum:
        noun = "identity" if per_rank == 1 else "identities"
        raise ValueError(
            f"ids_per_batch={ids_per_batch} over world size {num_replicas} gives {per_rank} "
            f"{noun} per rank: the triplet loss would have no negative (it needs another "
            f"identity on the same rank); use >= {minimum} x world size = "
            f"{minimum * num_replicas}, a multiple of the world size"
        )


def build_sampler(
    kind: str,
    pids: Sequence[int],
    modalities: Sequence[str],
    ids_per_batch: int,
    instances_per_modality: int,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    replacement: str = "when_short",
    remainder: str = "drop",
    min_ids_per_rank: int = MIN_IDS_PER_RANK,
) -> IdentitySampler:
    """The sampler named by ``kind`` (``data.sampler``); ``replacement`` applies to
    ``modality_balanced`` only, ``remainder`` to ``identity_modality`` only. A training batch
    needs ``min_ids_per_rank`` identities on every rank (see :func:`check_ids_per_rank`)."""
    check_ids_per_rank(ids_per_batch, num_replicas, min_ids_per_rank)
    common = dict(num_replicas=num_replicas, rank=rank, seed=seed)
    if kind == "modality_balanced":
        return ModalityBalancedSampler(
            pids,
            modalities,
            ids_per_batch,
            instances_per_modality,
            replacement=replacement,
            **common,
        )
    if kind == "identity_modality":
        return IdentityModalitySampler(
            pids, modalities, ids_per_batch, instances_per_modality, remainder=remainder, **common
        )
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
