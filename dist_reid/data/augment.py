"""Training augmentation (protocols.md section 6) as torchvision v2 pipelines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from dist_reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601 luma, the weights CAJ uses for its grayscale branch
LUMA = (0.2989, 0.5870, 0.1140)
# PIL's ``convert("L")`` weights, what torchvision's RandomGrayscale applies to a PIL image
PIL_LUMA = (0.299, 0.587, 0.114)


class ChannelAugment(torch.nn.Module):
    """CAJ's channel augmentation on a normalised CHW tensor.

    Visible: with probability ``p`` every channel is replaced by one randomly chosen channel.
    Infrared: with probability 3/4 one random channel is replicated, else with probability 1/2
    the image becomes luminance gray. (CAJ applies the visible op to an extra copy of the batch;
    here it is a per-image switch.)
    """

    def __init__(self, modality: str, p: float = 0.5) -> None:
        super().__init__()
        self.modality = modality
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.modality == "visible":
            if torch.rand(()) < self.p:
                channel = int(torch.randint(3, ()))
                return image[channel : channel + 1].expand_as(image).clone()
            return image
        if torch.rand(()) < 0.75:
            channel = int(torch.randint(3, ()))
            return image[channel : channel + 1].expand_as(image).clone()
        if torch.rand(()) < 0.5:
            gray = sum(w * image[c] for c, w in enumerate(LUMA))
            return gray.unsqueeze(0).expand_as(image).clone()
        return image


ERASING_MODES = ("torchvision", "released")
# released mode: the RandomErasing class the AGW-family and PDM repositories ship (Zhong et al.):
# aspect h/w uniform in [r1, 1/r1] with r1 = 0.3, up to 100 tries at a box that fits
RELEASED_ERASING_R1 = 0.3
RELEASED_ERASING_TRIES = 100


class ReleasedRandomErasing(torch.nn.Module):
    """Random erasing as the released VI-ReID code does it, on a normalised CHW tensor: with
    probability ``p`` a box of area ``scale`` x H x W (uniform) and aspect h/w uniform in
    [0.3, 1/0.3] is set to ``fill``; up to 100 tries at a box strictly inside the image."""

    def __init__(self, p: float, scale: tuple[float, float], fill: tuple[float, ...]) -> None:
        super().__init__()
        self.p, self.scale, self.fill = p, scale, fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        r1 = RELEASED_ERASING_R1
        for _ in range(RELEASED_ERASING_TRIES):
            area = height * width * float(torch.empty(()).uniform_(*self.scale))
            aspect = float(torch.empty(()).uniform_(r1, 1 / r1))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                y = int(torch.randint(0, height - h + 1, ()))
                x = int(torch.randint(0, width - w + 1, ()))
                image = image.clone()
                image[:, y : y + h, x : x + w] = torch.tensor(self.fill, dtype=image.dtype)[:, None, None]
                return image
        return image


@dataclass(frozen=True)
class AugmentOptions:
    pad: int = 10
    flip: bool = True
    random_erasing: float = 0.0  # probability; 0 = off (AGW's train.py has none)
    erasing_scale: tuple[float, float] = (0.02, 0.4)  # area fraction of the erased box
    erasing_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)  # written in normalised space
    # torchvision: aspect log-uniform in [0.3, 3.3], 10 tries; released: uniform, 100 tries
    erasing_mode: str = "torchvision"
    channel_aug: bool = False  # CAJ
    grayscale: float = 0.0  # probability of PIL-luma gray before normalising (PDM: 0.5)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.erasing_mode not in ERASING_MODES:
            raise ValueError(f"erasing_mode must be one of {ERASING_MODES}, got {self.erasing_mode!r}")


def build_train_transform(height: int, width: int, modality: str, options: AugmentOptions) -> v2.Compose:
    """PIL image -> augmented normalised tensor: Lanczos resize, (optional) grayscale, pad +
    random crop, flip, normalise, then (optional) channel augmentation and random erasing on the
    normalised tensor. Gray commutes with the zero pad, crop and flip, so its place among them
    does not matter (PDM grays between pad and crop)."""
    steps: list[torch.nn.Module] = [v2.Resize((height, width), interpolation=InterpolationMode.LANCZOS)]
    if options.grayscale > 0:
        steps.append(v2.RandomGrayscale(p=options.grayscale))
    if options.pad:
        steps += [v2.Pad(options.pad, fill=0), v2.RandomCrop((height, width))]
    if options.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(options.mean, options.std)]
    if options.channel_aug:
        steps.append(ChannelAugment(modality))
    if options.random_erasing > 0 and options.erasing_mode == "released":
        steps.append(
            ReleasedRandomErasing(options.random_erasing, options.erasing_scale, options.erasing_fill)
        )
    elif options.random_erasing > 0:
        steps.append(
            v2.RandomErasing(
                p=options.random_erasing,
                scale=options.erasing_scale,
                ratio=(0.3, 3.3),
                value=list(options.erasing_fill),
            )
        )
    return v2.Compose(steps)
