"""Models by name: ``MODELS.get(name)(**kwargs)``; a method adds a file and a registration."""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_reid.models.agw import AGW
from dist_reid.models.backbones import PooledBackbone
from dist_reid.models.emif import EMIF
from dist_reid.models.icre import ICRE
from dist_reid.models.mip import MIP
from dist_reid.models.pdm import PDM
from dist_reid.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")
MODELS.register("agw")(AGW)
MODELS.register("backbone")(PooledBackbone)
MODELS.register("icre")(ICRE)
MODELS.register("emif")(EMIF)
MODELS.register("pdm")(PDM)
MODELS.register("mip")(MIP)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    return MODELS.get(name)(**kwargs)


__all__ = ["AGW", "MODELS", "PooledBackbone", "create_model"]
