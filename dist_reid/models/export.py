"""A module exposing one modality's test-time embedding, for ONNX export and serving."""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingModule(nn.Module):
    """``forward(images[, cams]) -> embed(images, modality[, cams])`` for a fixed modality.

    Two-stream models route by modality, so each modality exports to its own graph. ``embed``
    is usually wrapped in ``no_grad`` for inference; the undecorated function is called so
    tracing sees plain tensor code.
    """

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__()
        if modality not in ("visible", "infrared"):
            raise ValueError(f"modality must be 'visible' or 'infrared', got {modality!r}")
        self.model = model
        self.modality = modality
        self._embed = getattr(type(model).embed, "__wrapped__", type(model).embed)
        self.takes_cams = "cams" in model.batch_fields

    def forward(self, images: torch.Tensor, cams: torch.Tensor | None = None) -> torch.Tensor:
        if self.takes_cams:
            return self._embed(self.model, images, self.modality, cams=cams)
        return self._embed(self.model, images, self.modality)
