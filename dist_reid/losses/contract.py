"""What the engine may rely on in a loss: ``loss(outputs, labels, modalities)`` returns named,
already-weighted terms; ``required_outputs`` names the model outputs it reads (checked against
the model's ``output_keys`` when both are built); an epoch-aware loss also has ``set_epoch``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ReIDLoss(Protocol):
    """The interface of every registered loss (``dist_reid.losses.LOSSES``)."""

    @property
    def required_outputs(self) -> tuple[str, ...]:
        """Model output keys this loss, as configured, cannot work without."""
        ...

    def __call__(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class EpochAwareLoss(ReIDLoss, Protocol):
    """A loss with epoch-gated terms (MIP's MSEL): the trainer reports each 0-based epoch."""

    def set_epoch(self, epoch: int) -> None: ...


__all__ = ["EpochAwareLoss", "ReIDLoss"]
