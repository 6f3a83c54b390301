"""Optimiser implementations (``optim.impl``) and SyncBatchNorm (``train.sync_bn``).

apex is not on PyPI (the ``apex`` package there is an unrelated 2013 project: never
``pip install apex``); clusters that have NVIDIA apex built from source get its fused
optimisers with ``optim.impl: apex`` or ``auto``. Everywhere else torch's own fused (CUDA) or
default implementations are used.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from dist_reid.config import ConfigError


def apex_available() -> bool:
    """NVIDIA apex with its fused optimisers importable (its CUDA extensions built)."""
    if importlib.util.find_spec("apex") is None:
        return False
    try:
        import apex.optimizers  # noqa: F401
    except Exception:  # a partial build raises on import of the CUDA extensions
        return False
    return True


def make_optimizer(
    name: str,
    impl: str,
    groups: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """``name`` sgd|adamw with ``impl`` auto|torch|apex.

    auto: apex's FusedSGD/FusedAdam when apex is importable and CUDA is present, else torch;
    torch: torch's fused kernels on CUDA, the default (foreach/for-loop) on CPU; apex: apex or
    one clear error.
    """
    if impl not in ("auto", "torch", "apex"):
        raise ConfigError(f"optim.impl: must be auto|torch|apex, got {impl!r}")
    if impl == "apex" and not apex_available():
        raise ConfigError(
            "optim.impl: 'apex' asked for but NVIDIA apex is not importable (it is built from "
            "source against the cluster's torch; the PyPI 'apex' is unrelated). Use auto or torch."
        )
    use_apex = impl == "apex" or (impl == "auto" and torch.cuda.is_available() and apex_available())
    if use_apex:
        from apex.optimizers import FusedAdam, FusedSGD

        if name == "sgd":
            return FusedSGD(
                groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
            )
        return FusedAdam(groups, lr=lr, weight_decay=weight_decay, adam_w_mode=True)
    # Parameters are still on the CPU here (the backend moves them), so decide by the device
    # they will train on.
    fused = {"fused": True} if torch.cuda.is_available() else {}
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **fused
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused)


def maybe_sync_batchnorm(model: nn.Module, enabled: bool) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over all ranks' samples, for small per-GPU
    batches). torch's SyncBatchNorm has no CPU kernel, hence CUDA only."""
    if not enabled:
        return model
    if not torch.cuda.is_available():
        raise ConfigError(
            "train.sync_bn: SyncBatchNorm needs CUDA (torch has no CPU implementation); "
            "set train.sync_bn=false on CPU"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
