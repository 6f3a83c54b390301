"""What the engine may rely on in a model: the method contract, checked once when it is built.

A model takes ``(images, modalities, **fields)`` in training, where ``fields`` are the batch
fields it names in ``batch_fields`` (from :data:`BATCH_FIELDS`), and returns a dict whose keys
it lists in ``output_keys``; ``embed(images, modality, **fields)`` gives the test embedding;
``lr_groups()`` names its parameter groups with their lr multipliers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

# Per-image batch fields beyond images, labels and modalities that a model may ask for.
BATCH_FIELDS = ("cams",)


@runtime_checkable
class ReIDModel(Protocol):
    """The interface of every registered model (``dist_reid.models.MODELS``)."""

    batch_fields: tuple[str, ...]

    @property
    def output_keys(self) -> tuple[str, ...]:
        """Keys of the dict ``forward`` returns, as configured."""
        ...

    def forward(
        self, images: torch.Tensor, modalities: torch.Tensor, **fields: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...

    def embed(
        self, images: torch.Tensor, modality: str, **fields: torch.Tensor
    ) -> torch.Tensor: ...

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]: ...


def contract_errors(model: object) -> list[str]:
    """What ``model`` lacks of :class:`ReIDModel` (empty when it complies)."""
    missing = [
        name
        for name in ("batch_fields", "output_keys", "forward", "embed", "lr_groups")
        if not hasattr(model, name)
    ]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    unknown = sorted(set(model.batch_fields) - set(BATCH_FIELDS))
    return (
        [f"asks for unknown batch fields {unknown} (known: {list(BATCH_FIELDS)})"]
        if unknown
        else []
    )


__all__ = ["BATCH_FIELDS", "ReIDModel", "contract_errors"]
