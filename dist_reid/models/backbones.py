"""Backbones by name (timm), with weights from a local file only."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn


class PretrainedWeightsError(ValueError):
    """A ``model.pretrained`` file is missing or does not fit the backbone."""


def _read_weights(path: Path, missing: Exception, unreadable: type[Exception], prefix: str):
    """``torch.load(weights_only=True)`` on CPU; a missing or unreadable file is one error."""
    if not path.is_file():
        raise missing
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise unreadable(f"{prefix}: {exc}") from None


def load_local_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state dict from ``path`` (``weights_only=True``), ignoring classifier heads."""
    path = Path(path)
    state = _read_weights(
        path,
        PretrainedWeightsError(f"model.pretrained: weights file {path} does not exist"),
        PretrainedWeightsError,
        f"model.pretrained: cannot read {path}",
    )
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"model.pretrained: {path} does not hold a state dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise PretrainedWeightsError(
            f"model.pretrained: no tensor of {path} matches the backbone's parameter names/shapes"
        )
    model.load_state_dict(usable, strict=False)
    return model


def load_model_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a whole model's weights (a state dict, or a checkpoint dict with a "model" entry),
    strictly, with ``weights_only=True``; errors name the file."""
    path = Path(path)
    state = _read_weights(
        path,
        FileNotFoundError(f"checkpoint {path} does not exist"),
        ValueError,
        f"checkpoint {path} is unreadable (truncated or not a torch file)",
    )
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"checkpoint {path} does not fit the configured model: {first}") from None
    return model


def create_backbone(name: str, pretrained: str | os.PathLike[str] | None = None) -> nn.Module:
    """A timm backbone returning pooled features (no classifier). Never downloads weights."""
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"model.backbone: unknown backbone {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if pretrained:
        load_local_weights(model, pretrained)
    return model


class PooledBackbone(nn.Module):
    """A backbone used as it is: the pooled feature is the embedding, for every modality."""

    def __init__(self, backbone: str = "resnet50", pretrained: str | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """Test-time embedding; ``modality`` selects a stem in two-stream models (unused here)."""
        del modality
        return self.backbone(images)
