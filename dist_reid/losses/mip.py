"""MIP's objective (methods.md section 5.2): ID + soft-margin triplet over the global and JPM
features, the code's MSEL_modal term and the paper's IAEL, each behind a switch."""

from __future__ import annotations

import torch
from reid_kernels import pairwise_distance, triplet_mining_loss
from torch import nn

from dist_reid.losses.identity import identity_loss


def msel_loss(
    features: torch.Tensor, labels: torch.Tensor, modalities: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """MSEL_modal (code only): per anchor, ``intra`` = mean distance to the other same-identity
    samples of its modality, ``cross`` = mean distance to the same-identity samples of the other
    modality; ``0.5 [mean_V (cross - intra)^2 + mean_IR (cross - intra)^2]``.

    With the sampler's K per modality, ``intra`` is the code's mean of the K-1 largest
    same-modality positive distances (the K-th is the anchor itself, at 0).
    """
    dist = pairwise_distance(features, backend=backend)
    same_id = labels[:, None] == labels[None, :]
    same_mod = modalities[:, None] == modalities[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    intra_mask = (same_id & same_mod & ~eye).to(dist.dtype)
    cross_mask = (same_id & ~same_mod).to(dist.dtype)
    intra = (dist * intra_mask).sum(1) / intra_mask.sum(1).clamp_min(1)
    cross = (dist * cross_mask).sum(1) / cross_mask.sum(1).clamp_min(1)
    gap = (cross - intra).pow(2)
    total = dist.new_zeros(())
    for code in (0, 1):
        rows = modalities == code
        if bool(rows.any()):
            total = total + 0.5 * gap[rows].mean()
    return total


class MIPLoss(nn.Module):
    """Weighted MIP terms (defaults = the released ``train.sh``):

    * ``id``: ``id_weight * (0.5 CE(global) + 0.5 mean_k CE(local_k))`` (no label smoothing);
    * ``tri``: the same weighting of batch-hard triplets on pre-BN features, soft margin
      (``margin: null``, code ``NO_MARGIN=True``) or a hinge margin;
    * ``msel``: ``msel_weight * (MSEL(global) + mean_k MSEL(local_k))`` (code: 0.25), from the
      ``msel_start_epoch``-th epoch counted from 1, as the released ``MSEL_EPOCH`` (10: on from
      0-based epoch 9); the trainer reports the 0-based epoch through ``set_epoch``;
    * ``iael``: ``iael_weight * mean_l CE(iael_logits_l)`` (code: 0.5) when the model has the IAEL
      head (``model.options.iael``; released script: off).
    """

    def __init__(
        self,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        margin: float | None = None,
        global_weight: float = 0.5,
        msel_weight: float = 0.25,
        msel_start_epoch: int = 10,
        iael_weight: float = 0.5,
        label_smoothing: float = 0.0,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= global_weight <= 1.0:
            raise ValueError(f"loss.options.global_weight must be in [0, 1], got {global_weight}")
        self.id_weight, self.triplet_weight, self.margin = id_weight, triplet_weight, margin
        self.global_weight = global_weight
        self.msel_weight, self.msel_start_epoch = msel_weight, msel_start_epoch
        self.iael_weight, self.label_smoothing, self.kernels = iael_weight, label_smoothing, kernels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch start with the 0-based epoch."""
        self.epoch = epoch

    @property
    def msel_on(self) -> bool:
        """The released loop counts epochs from 1 and adds MSEL when ``epoch >= MSEL_EPOCH``."""
        return self.epoch + 1 >= self.msel_start_epoch

    def _split(self, outputs: dict[str, torch.Tensor], fn, g: float) -> torch.Tensor:
        """``g * fn(global) + (1 - g) * mean_k fn(local_k)`` (just ``fn(global)`` without JPM)."""
        value = fn(outputs["global"], outputs["logits_global"])
        if "local" not in outputs:
            return value
        local = outputs["local"]
        parts = [fn(local[:, k], outputs["logits_local"][:, k]) for k in range(local.shape[1])]
        return g * value + (1 - g) * torch.stack(parts).mean()

    # JPM's local parts and IAEL's logits are read when the model has them
    required_outputs = ("global", "logits_global")

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        k = self.kernels
        terms: dict[str, torch.Tensor] = {}
        if self.id_weight:
            terms["id"] = self.id_weight * self._split(
                outputs,
                lambda f, z: identity_loss(z, labels, self.label_smoothing),
                self.global_weight,
            )
        if self.triplet_weight:
            terms["tri"] = self.triplet_weight * self._split(
                outputs,
                lambda f, z: triplet_mining_loss(f, labels, self.margin, "hard", backend=k),
                self.global_weight,
            )
        if self.msel_weight and self.msel_on:
            # The code weights global and mean-local MSEL equally (0.25 each): 2 * (0.5, 0.5).
            msel = 2 * self._split(outputs, lambda f, z: msel_loss(f, labels, modalities, k), 0.5)
            terms["msel"] = self.msel_weight * msel
        if self.iael_weight and "iael_logits" in outputs:
            logits = outputs["iael_logits"]
            ce = [
                identity_loss(logits[:, i], labels, self.label_smoothing)
                for i in range(logits.shape[1])
            ]
            terms["iael"] = self.iael_weight * torch.stack(ce).mean()
        return terms
