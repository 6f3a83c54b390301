"""Triplet losses; the math lives in ``reid_kernels`` (fused kernels + torch reference)."""

from __future__ import annotations

import torch
from reid_kernels import WRT_FORMS, triplet_mining_loss


def check_wrt_form(wrt_form: str) -> str:
    """``loss.options.wrt_form`` must be ``official`` or ``exact``; returns it."""
    if wrt_form not in WRT_FORMS:
        raise ValueError(f"loss.options.wrt_form must be one of {WRT_FORMS}, got {wrt_form!r}")
    return wrt_form


def weighted_regularized_triplet(
    features: torch.Tensor,
    labels: torch.Tensor,
    backend: str = "auto",
    wrt_form: str = "official",
) -> torch.Tensor:
    """AGW's WRT: ``mean_i softplus(d+_i - d-_i)`` with softmax-weighted positive/negative
    distances over the whole mixed-modality batch; no margin, no hyperparameters.

    ``wrt_form="official"`` (default) computes the weights as AGW's released code does, whose
    negative weights collapse towards 0 once the nearest negatives are ~20 apart;
    ``"exact"`` uses exact softmaxes (``reid_kernels.triplet`` has both formulas).
    """
    return triplet_mining_loss(
        features.float(),
        labels,
        margin=None,
        mode="weighted",
        backend=backend,
        wrt_form=check_wrt_form(wrt_form),
    )


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3, backend: str = "auto"
) -> torch.Tensor:
    """Hardest positive / nearest negative; hinge with ``margin``, soft margin when None."""
    return triplet_mining_loss(
        features.float(), labels, margin=margin, mode="hard", backend=backend
    )
