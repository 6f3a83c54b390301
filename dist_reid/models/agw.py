"""AGW (Ye et al., TPAMI): two-stream ResNet + non-local + GeM + BNNeck (methods.md section 1)."""

from __future__ import annotations

import os

import torch
from torch import nn

from dist_reid.models.layers import BNNeck, GeM, backbone_head_groups
from dist_reid.models.resnet import INFRARED, VISIBLE, TwoStreamResNet


class AGW(nn.Module):
    """``forward`` returns ``{"features": pre-BN GeM feature (metric losses), "bn_features",
    "logits"}``; ``embed`` returns the test-time embedding (BN feature by default, the head
    papers quote; ``test_feature="pool"`` gives the pre-BN one).

    ``non_local_width``: ``"official"`` (default) gives each non-local block the released code's
    inter-channel width of 1; ``"half"`` gives C/2, the usual form (~7.3 M more parameters
    on ResNet-50).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str | os.PathLike[str] | None = None,
        last_stride: int = 1,
        non_local: bool = True,
        non_local_width: str = "official",
        gem_p: float = 3.0,
        test_feature: str = "bn",
    ) -> None:
        super().__init__()
        if test_feature not in {"bn", "pool"}:
            raise ValueError(f"model.test_feature must be 'bn' or 'pool', got {test_feature!r}")
        self.backbone = TwoStreamResNet(
            backbone,
            pretrained,
            last_stride,
            (0, 2, 3, 0) if non_local else (0, 0, 0, 0),
            non_local_width,
        )
        self.pool = GeM(gem_p)
        self.neck = BNNeck(self.backbone.out_channels, num_classes)
        self.test_feature = test_feature

    batch_fields: tuple[str, ...] = ()
    output_keys = ("features", "bn_features", "logits")

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """Parameter groups with their lr multipliers: AGW trains BNNeck and classifier at the
        full lr and the backbone at 0.1x (``optim.lr_mults`` overrides by group name)."""
        return backbone_head_groups(self, head=self.neck.parameters())

    def forward(self, images: torch.Tensor, modalities: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.pool(self.backbone(images, modalities))
        bn_features, logits = self.neck(features)
        return {"features": features, "bn_features": bn_features, "logits": logits}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        code = VISIBLE if modality == "visible" else INFRARED
        features = self.pool(self.backbone.forward_modality(images, code))
        return self.neck.bn(features) if self.test_feature == "bn" else features
