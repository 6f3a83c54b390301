"""Identity (classification) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy in fp32 (architecture decision 7), optional label smoothing."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
