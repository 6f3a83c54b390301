"""Backbones by name (timm), initialised by ``model.pretrained`` (imagenet, a file or None)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dist_reid.models.pretrained import (
    PretrainedWeightsError,
    load_backbone_weights,
    pretrained_state,
)

__all__ = [
    "PooledBackbone",
    "PretrainedWeightsError",
    "create_backbone",
    "load_model_weights",
    "load_pretrained",
]


def _read_weights(path: Path, missing: Exception, unreadable: type[Exception], prefix: str):
    """``torch.load(weights_only=True)`` on CPU; a missing or unreadable file is one error."""
    if not path.is_file():
        raise missing
    if path.stat().st_size == 0:
        raise unreadable(f"{prefix}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # one line; torch's own refusal text advises the unsafe load, so it is not repeated
        reason = (
            "it holds pickled Python objects, refused (loading them could run code)"
            if "eights only load failed" in text
            else next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        )
        raise unreadable(f"{prefix}: {reason}") from None


def load_pretrained(
    model: nn.Module, pretrained: str | os.PathLike[str] | None, backbone: str
) -> nn.Module:
    """``model.pretrained`` onto a backbone module: ``imagenet`` (the hub cache), a local file
    (``weights_only=True``) or None (random init); see ``dist_reid.models.pretrained``."""
    found = pretrained_state(pretrained, backbone)
    if found is not None:
        load_backbone_weights(model, found[1], found[0])
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
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict ({type(state).__name__})")
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"checkpoint {path} does not fit the configured model: {problem}")
    model.load_state_dict(state)
    return model


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, Any], show: int = 3
) -> str:
    """One readable line on how ``given`` differs from ``expected`` (empty when it fits): the
    first few missing, unexpected and differently shaped keys, with counts."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)


def create_backbone(name: str, pretrained: str | os.PathLike[str] | None = None) -> nn.Module:
    """A timm backbone returning pooled features (no classifier); ``pretrained`` as in
    ``load_pretrained`` (``imagenet`` reads the hub cache, offline by default)."""
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"model.backbone: unknown backbone {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return load_pretrained(model, pretrained, name)


class PooledBackbone(nn.Module):
    """A backbone used as it is: the pooled feature is the embedding, for every modality.
    For evaluation only (no training outputs or lr groups: ``check_method`` refuses to train it)."""

    batch_fields: tuple[str, ...] = ()

    def __init__(self, backbone: str = "resnet50", pretrained: str | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """Test-time embedding; ``modality`` selects a stem in two-stream models (unused here)."""
        del modality
        return self.backbone(images)
