"""EMIF (La Zhang, Xu Zhao et al., IJMLC 2025) as a **reconstruction** (methods.md section 4).

Only the abstract is public (no code, no full text). Known: an intra-modality enhancing module
with independent branches per modality, and a modality-invariant module with shared parameters
whose features are aligned by a Gaussian distribution-consistency loss. Everything else here is
our design; every guessed detail is a constructor switch. No claim of parity with the paper.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from dist_reid.models.layers import BNNeck, GeM, backbone_head_groups
from dist_reid.models.resnet import INFRARED, VISIBLE, TwoStreamResNet

_BRANCHES = ("stage4", "light")
_TEST = ("bn", "pool", "concat")


class EMIF(nn.Module):
    """Two-stream ResNet whose shared stage 4 feeds the modality-invariant head (GeM, BNNeck,
    shared classifier), plus one intra-modality enhancing branch per modality (GeM, its own
    BNNeck and classifier).

    ``forward`` returns ``{"features", "bn_features", "logits"}`` of the shared head and
    ``{"branch_features", "branch_bn_features", "branch_logits"}``: row i comes from the branch
    of sample i's modality (each branch classifies with its own weights).

    Guessed choices (switches; methods.md 4.1 [I]):

    * ``branch`` (``"stage4"`` | ``"light"``): each branch is its own copy of stage 4 fed with
      the shared stage-3 map, or a light 1x1 conv + BN + ReLU on the shared stage-4 map.
    * ``branch_dim`` (512): width of the light branch (the stage-4 copy keeps stage 4's width).
    * ``test_feature`` (``"bn"`` | ``"pool"`` | ``"concat"``): the shared BN feature, the shared
      pre-BN feature, or the shared BN feature concatenated with the query modality's branch BN
      feature (whether the paper concatenates is unknown).
    * ``non_local`` (False): AGW's non-local blocks in the backbone.
      ``non_local_width`` (``"official"``: AGW's released width of 1 inter-channel |
      ``"half"``: C/2).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str | os.PathLike[str] | None = None,
        last_stride: int = 1,
        non_local: bool = False,
        non_local_width: str = "official",
        branch: str = "stage4",
        branch_dim: int = 512,
        gem_p: float = 3.0,
        test_feature: str = "bn",
    ) -> None:
        super().__init__()
        if branch not in _BRANCHES:
            raise ValueError(f"model.options.branch must be one of {_BRANCHES}, got {branch!r}")
        if test_feature not in _TEST:
            raise ValueError(
                f"model.options.test_feature must be one of {_TEST}, got {test_feature!r}"
            )
        self.backbone = TwoStreamResNet(
            backbone,
            pretrained,
            last_stride,
            (0, 2, 3, 0) if non_local else (0, 0, 0, 0),
            non_local_width,
        )
        dim = self.backbone.out_channels
        self.branch_type = branch
        if branch == "stage4":
            stage4 = self.backbone.stages[3]
            self.branches = nn.ModuleList([copy.deepcopy(stage4), copy.deepcopy(stage4)])
            self.branch_dim = dim
        else:
            self.branches = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(dim, branch_dim, 1, bias=False),
                    nn.BatchNorm2d(branch_dim),
                    nn.ReLU(True),
                )
                for _ in range(2)
            )
            self.branch_dim = branch_dim
        self.pool = GeM(gem_p)
        self.neck = BNNeck(dim, num_classes)
        self.branch_necks = nn.ModuleList(BNNeck(self.branch_dim, num_classes) for _ in range(2))
        self.test_feature = test_feature

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """``backbone`` (0.1x, as AGW) and ``head`` (shared neck, branches and their necks: 1x;
        a stage-4 branch copy starts from the backbone's weights but is trained as a head)."""
        return backbone_head_groups(self, backbone=self.backbone.parameters())

    def _trunk(
        self, images: torch.Tensor, modalities: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage-3 map, shared stage-4 map)."""
        x3 = self.backbone.stages[:3](self.backbone.stems(images, modalities))
        return x3, self.backbone.stages[3](x3)

    def _branch(
        self, code: int, x3: torch.Tensor, x4: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled, BN, logits) of one modality's branch on its rows."""
        inp = x3 if self.branch_type == "stage4" else x4
        pooled = self.pool(self.branches[code](inp))
        bn, logits = self.branch_necks[code](pooled)
        return pooled, bn, logits

    batch_fields: tuple[str, ...] = ()
    output_keys = (
        "features",
        "bn_features",
        "logits",
        "branch_features",
        "branch_bn_features",
        "branch_logits",
    )

    def forward(self, images: torch.Tensor, modalities: torch.Tensor) -> dict[str, torch.Tensor]:
        x3, x4 = self._trunk(images, modalities)
        features = self.pool(x4)
        bn_features, logits = self.neck(features)
        n = images.shape[0]
        branch_features = features.new_zeros((n, self.branch_dim))
        branch_bn = features.new_zeros((n, self.branch_dim))
        branch_logits = logits.new_zeros(logits.shape)
        for code in (VISIBLE, INFRARED):
            rows = modalities == code
            if bool(rows.any()):
                pooled, bn, lg = self._branch(code, x3[rows], x4[rows])
                # index_put keeps one differentiable tensor per output across both branches
                branch_features = branch_features.index_put((rows,), pooled)
                branch_bn = branch_bn.index_put((rows,), bn)
                branch_logits = branch_logits.index_put((rows,), lg.to(branch_logits.dtype))
        return {
            "features": features,
            "bn_features": bn_features,
            "logits": logits,
            "branch_features": branch_features,
            "branch_bn_features": branch_bn,
            "branch_logits": branch_logits,
        }

    @torch.no_grad()
    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        code = VISIBLE if modality == "visible" else INFRARED
        modalities = torch.full((images.shape[0],), code, device=images.device)
        x3, x4 = self._trunk(images, modalities)
        features = self.pool(x4)
        if self.test_feature == "pool":
            return features
        shared = self.neck.bn(features)
        if self.test_feature == "bn":
            return shared
        _, branch_bn, _ = self._branch(code, x3, x4)
        return torch.cat([shared, branch_bn], dim=1)
