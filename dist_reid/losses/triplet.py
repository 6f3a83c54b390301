"""Triplet losses; the math lives in ``reid_kernels`` (fused kernels + torch reference)."""

from __future__ import annotations

import torch
from reid_kernels import triplet_mining_loss


def weighted_regularized_triplet(
    features: torch.Tensor, labels: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """AGW's WRT: ``mean_i softplus(d+_i - d-_i)`` with softmax-weighted positive/negative
    distances over the whole mixed-modality batch; no margin, no hyperparameters."""
    return triplet_mining_loss(
        features.float(), labels, margin=None, mode="weighted", backend=backend
    )


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3, backend: str = "auto"
) -> torch.Tensor:
    """Hardest positive / nearest negative; hinge with ``margin``, soft margin when None."""
    return triplet_mining_loss(
        features.float(), labels, margin=margin, mode="hard", backend=backend
    )
