"""AGW's objective: identity cross-entropy on the BN feature + WRT on the pre-BN feature."""

from __future__ import annotations

import torch
from torch import nn

from dist_reid.losses.identity import identity_loss
from dist_reid.losses.triplet import (
    batch_hard_triplet,
    check_wrt_form,
    weighted_regularized_triplet,
)


class AGWLoss(nn.Module):
    """``L = id_weight * CE + triplet_weight * (WRT | batch-hard)``; returns the named terms.

    ``triplet="hard"`` with ``margin=0.3`` is the reference's non-AGW baseline loss.
    ``wrt_form``: ``"official"`` (the released code's WRT weights, default) or ``"exact"``
    (exact softmaxes); see :func:`weighted_regularized_triplet`.
    """

    def __init__(
        self,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        triplet: str = "wrt",
        margin: float | None = 0.3,
        label_smoothing: float = 0.0,
        kernels: str = "auto",
        wrt_form: str = "official",
    ) -> None:
        super().__init__()
        if triplet not in {"wrt", "hard"}:
            raise ValueError(f"loss.triplet must be 'wrt' or 'hard', got {triplet!r}")
        self.wrt_form = check_wrt_form(wrt_form)
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.triplet = triplet
        self.margin = margin
        self.label_smoothing = label_smoothing
        self.kernels = kernels

    required_outputs = ("logits", "features")

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        del modalities  # AGW's losses treat the batch as one mixed-modality set
        terms = {
            "id": self.id_weight * identity_loss(outputs["logits"], labels, self.label_smoothing)
        }
        if self.triplet == "wrt":
            tri = weighted_regularized_triplet(
                outputs["features"], labels, self.kernels, self.wrt_form
            )
        else:
            tri = batch_hard_triplet(outputs["features"], labels, self.margin, self.kernels)
        terms[self.triplet] = self.triplet_weight * tri
        return terms
