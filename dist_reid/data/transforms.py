"""Image transforms (torchvision v2). Test-time: the reference's Lanczos resize + normalise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_test_transform(
    height: int = 288,
    width: int = 144,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL image -> float tensor (3, height, width) normalised with ``mean``/``std``
    (``data.mean``/``data.std``: ImageNet statistics, or 0.5/0.5 for MIP's ViT).

    The reference resizes test images with PIL's Lanczos filter; a bilinear tensor resize shifts
    the metrics slightly (protocols.md 1.5), so the resize runs on the PIL image.
    """
    return v2.Compose(
        [
            v2.Resize((height, width), interpolation=InterpolationMode.LANCZOS),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
