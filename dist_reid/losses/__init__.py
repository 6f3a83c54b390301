"""Losses by name: a method's loss module takes plain arguments and returns named terms."""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_reid.losses.agw import AGWLoss
from dist_reid.losses.emif import EMIFLoss
from dist_reid.losses.icre import ICRELoss
from dist_reid.losses.identity import identity_loss
from dist_reid.losses.mip import MIPLoss
from dist_reid.losses.pdm import PDMLoss
from dist_reid.losses.triplet import batch_hard_triplet, weighted_regularized_triplet
from dist_reid.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")
LOSSES.register("agw")(AGWLoss)
LOSSES.register("icre")(ICRELoss)
LOSSES.register("emif")(EMIFLoss)
LOSSES.register("pdm")(PDMLoss)
LOSSES.register("mip")(MIPLoss)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    return LOSSES.get(name)(**kwargs)


__all__ = [
    "LOSSES",
    "AGWLoss",
    "batch_hard_triplet",
    "create_loss",
    "identity_loss",
    "weighted_regularized_triplet",
]
