"""Two-stream ResNet: modality-specific stems, shared residual stages (AGW's backbone)."""

from __future__ import annotations

import copy
import os

import torch
import torchvision
from torch import nn

from dist_reid.models.backbones import load_pretrained
from dist_reid.models.layers import NonLocal

VISIBLE, INFRARED = 0, 1  # modality codes carried in batches


def _set_last_stride(stage: nn.Sequential, stride: int) -> None:
    block = stage[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _insert_non_local(stage: nn.Sequential, count: int, width: str) -> nn.Sequential:
    """Non-local blocks after the last ``count`` residual blocks of a stage (AGW: stage 2 x2,
    stage 3 x3). ``width="official"`` keeps the released code's 1 inter-channel (its
    ``Non_local`` divides the reduction ratio by itself); ``"half"`` uses C/2."""
    blocks = list(stage)
    channels = (
        blocks[-1].bn2.num_features
        if not hasattr(blocks[-1], "bn3")
        else blocks[-1].bn3.num_features
    )
    inter = 1 if width == "official" else channels // 2
    out = []
    for i, block in enumerate(blocks):
        out.append(block)
        if i >= len(blocks) - count:
            out.append(NonLocal(channels, inter))
    return nn.Sequential(*out)


class TwoStreamResNet(nn.Module):
    """torchvision ResNet by name, split into a visible stem, an infrared stem and shared stages.

    ``forward(images, modalities)`` routes each image through its modality's stem (BatchNorm
    statistics stay per modality, as in the reference), then through the shared stages.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        pretrained: str | os.PathLike[str] | None = None,
        last_stride: int = 1,
        non_local: tuple[int, int, int, int] = (0, 2, 3, 0),
        non_local_width: str = "official",
    ) -> None:
        super().__init__()
        if arch not in {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}:
            raise ValueError(f"model.backbone: {arch!r} is not a torchvision ResNet")
        if non_local_width not in {"half", "official"}:
            raise ValueError(
                f"model.options.non_local_width must be 'official' or 'half', "
                f"got {non_local_width!r}"
            )
        base = torchvision.models.get_model(arch, weights=None)
        # Loaded before the stem is copied: both streams start from the same weights, as in
        # the released code (timm ResNet files use torchvision's parameter names).
        load_pretrained(base, pretrained, arch)
        stem = nn.Sequential(base.conv1, base.bn1, base.relu, base.maxpool)
        self.visible_stem = stem
        self.infrared_stem = copy.deepcopy(stem)
        stages = [base.layer1, base.layer2, base.layer3, base.layer4]
        _set_last_stride(stages[3], last_stride)
        self.stages = nn.Sequential(
            *[
                _insert_non_local(s, n, non_local_width) if n else s
                for s, n in zip(stages, non_local, strict=True)
            ]
        )
        self.out_channels = base.fc.in_features

    def stems(self, images: torch.Tensor, modalities: torch.Tensor) -> torch.Tensor:
        visible = modalities == VISIBLE
        if bool(visible.all()):
            return self.visible_stem(images)
        if not bool(visible.any()):
            return self.infrared_stem(images)
        vis = self.visible_stem(images[visible])
        ir = self.infrared_stem(images[~visible])
        out = vis.new_empty((images.shape[0], *vis.shape[1:]))
        out[visible] = vis
        out[~visible] = ir
        return out

    def forward(self, images: torch.Tensor, modalities: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stems(images, modalities))

    def forward_modality(self, images: torch.Tensor, modality: int) -> torch.Tensor:
        """All images of one modality: static routing (no data-dependent branch, so it traces
        and exports)."""
        stem = self.visible_stem if modality == VISIBLE else self.infrared_stem
        return self.stages(stem(images))
