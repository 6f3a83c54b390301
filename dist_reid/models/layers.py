"""Building blocks shared by the methods: GeM pooling, non-local block, BNNeck."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean_hw x^p)^(1/p)`` with fixed p (AGW: p = 3).

    The clamp keeps the 1/p power differentiable where a channel is all zero after ReLU.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class NonLocal(nn.Module):
    """Embedded dot-product non-local block as AGW uses it: ``z = BN(W(f g)) + x`` with
    ``f = theta^T phi / N`` (no softmax); W's BN starts at zero, so the block starts as identity.

    Without a softmax the product is associative, so ``theta (phi^T g) / N`` is computed instead
    of materialising the N x N affinity: same value, O(N C^2) instead of O(N^2 C).
    """

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.inter = inter_channels
        self.g = nn.Conv2d(channels, inter_channels, 1)
        self.theta = nn.Conv2d(channels, inter_channels, 1)
        self.phi = nn.Conv2d(channels, inter_channels, 1)
        self.out = nn.Sequential(nn.Conv2d(inter_channels, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        g = self.g(x).reshape(b, self.inter, n)  # (b, c', n)
        theta = self.theta(x).reshape(b, self.inter, n)
        phi = self.phi(x).reshape(b, self.inter, n)
        context = torch.bmm(phi, g.transpose(1, 2)) / n  # (b, c', c') = phi g^T / N
        y = torch.bmm(context.transpose(1, 2), theta)  # (b, c', n) = (theta^T phi g^T / N)^T
        return self.out(y.reshape(b, self.inter, h, w)) + x


class BNNeck(nn.Module):
    """BatchNorm1d with its shift frozen at zero, then a bias-free classifier (N(0, 0.001))."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn(features)
        return bn, self.classifier(bn)


def backbone_head_groups(
    module: nn.Module,
    *,
    head: Iterable[nn.Parameter] | None = None,
    backbone: Iterable[nn.Parameter] | None = None,
    backbone_mult: float = 0.1,
) -> dict[str, tuple[list[nn.Parameter], float]]:
    """The two lr groups of the AGW-family recipes: ``{"backbone": (params, backbone_mult),
    "head": (params, 1.0)}``. Name either side; every other parameter of ``module`` goes to the
    other one."""
    if (head is None) == (backbone is None):
        raise ValueError("give exactly one of head= or backbone=")
    named = list(head if head is not None else backbone)
    ids = {id(p) for p in named}
    rest = [p for p in module.parameters() if id(p) not in ids]
    head_params, backbone_params = (named, rest) if head is not None else (rest, named)
    return {"backbone": (backbone_params, backbone_mult), "head": (head_params, 1.0)}
