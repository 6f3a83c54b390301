"""Normalisation and augmentation keys in the torch transforms (no DALI needed): grayscale,
erasing area and fill, ``data.mean``/``data.std``; each checked against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dist_reid.data.augment import AugmentOptions, build_train_transform
from dist_reid.data.transforms import build_test_transform

H, W = 48, 24


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _apply(transform, image: Image.Image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


def _reference(image: Image.Image, mean, std) -> torch.Tensor:
    """float64 (pixel / 255 - mean) / std of the image (already H x W: resize is the identity)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64
    )[:, None, None]


@pytest.mark.parametrize(
    "mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]
)
def test_mean_and_std_normalise_train_and_test_images(mean, std):
    image = _image(1)
    test = build_test_transform(H, W, mean, std)(image).double()
    torch.testing.assert_close(test, _reference(image, mean, std), rtol=0, atol=1e-6)
    options = AugmentOptions(pad=0, flip=False, mean=mean, std=std)
    train = _apply(build_train_transform(H, W, "visible", options), image, 0).double()
    torch.testing.assert_close(train, _reference(image, mean, std), rtol=0, atol=1e-6)


def test_grayscale_one_is_pil_luma_in_every_channel():
    image = _image(2)
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    options = AugmentOptions(pad=0, flip=False, grayscale=1.0, mean=mean, std=std)
    out = _apply(build_train_transform(H, W, "infrared", options), image, 0).double()
    gray = np.asarray(image.convert("L"), dtype=np.float64) / 255  # PIL: 299/587/114 per mille
    expected = (
        torch.from_numpy(gray)[None] - torch.tensor(mean, dtype=torch.float64)[:, None, None]
    ) / (torch.tensor(std, dtype=torch.float64)[:, None, None])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_mip_gray_before_normalising_equals_the_released_gray_after_it():
    # MIP's released AUG 2 grays the normalised tensor (torchvision RandomGrayscale on a tensor:
    # luma 0.2989/0.587/0.114). With mean = std = 0.5 on every channel the luma of the normalised
    # image is the normalised luma, so our gray-before-normalising preset is the same map (up to
    # PIL's rounding of the gray image to uint8: one level is 2/255 after dividing by std 0.5).
    from torchvision.transforms.v2 import functional as F

    image = _image(4)
    options = AugmentOptions(pad=0, flip=False, grayscale=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    ours = _apply(build_train_transform(H, W, "visible", options), image, 0)
    released = F.rgb_to_grayscale(_reference(image, (0.5,) * 3, (0.5,) * 3).float(), 3)
    torch.testing.assert_close(ours, released, rtol=0, atol=2.02 / 255)
    assert (ours - released).abs().mean() < 1 / 255


def test_grayscale_probability_is_honoured():
    image = _image(3)
    transform = build_train_transform(
        H, W, "visible", AugmentOptions(pad=0, flip=False, grayscale=0.5)
    )
    grayed = 0
    for seed in range(200):
        out = _apply(transform, image, seed)
        raw = (
            out * torch.tensor((0.229, 0.224, 0.225))[:, None, None]
            + torch.tensor((0.485, 0.456, 0.406))[:, None, None]
        )
        grayed += bool(torch.allclose(raw[0], raw[1], atol=1e-5))
    assert 75 <= grayed <= 125  # binomial(200, 0.5): +-3.5 sd


def test_erasing_box_area_and_fill_in_normalised_space():
    fill = (0.485, 0.456, 0.406)
    options = AugmentOptions(
        pad=0, flip=False, random_erasing=1.0, erasing_scale=(0.2, 0.8), erasing_fill=fill
    )
    transform = build_train_transform(H, W, "visible", options)
    areas = []
    for seed in range(100):
        out = _apply(transform, _image(seed), seed)
        erased = (out == torch.tensor(fill)[:, None, None]).all(0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(erased.sum()) == h * w  # one rectangle holding exactly the fill
        areas.append(h * w / (H * W))
    slack = (H + W + 1) / (H * W)  # box sides are rounded to whole pixels
    assert min(areas) >= 0.2 - slack and max(areas) <= 0.8 + slack
    # default keys: today's 0.02-0.4 range filled with zeros
    default = build_train_transform(
        H, W, "visible", AugmentOptions(pad=0, flip=False, random_erasing=1.0)
    )
    zero = [(_apply(default, _image(s), s) == 0).all(0).float().mean() for s in range(100)]
    assert max(zero) <= 0.4 + slack and min(zero) > 0


# Released RandomErasing (PDM random_erasing.py, r1=0.3; random.seed(0), 20 000 draws with
# probability 1 on a zero 3x96x48 tensor): box h/w mean 2.082 (sd 0.69) and area fraction mean
# 0.454 (sd 0.162) for sl, sh = 0.2, 0.8; h/w 1.901 (sd 0.84), area 0.203 (sd 0.108) for 0.02, 0.4.
RELEASED_ERASING = {(0.2, 0.8): (2.082, 0.454), (0.02, 0.4): (1.901, 0.203)}
EH, EW = 96, 48


def erased_boxes(erase, draws: int) -> tuple[np.ndarray, np.ndarray]:
    """(h/w, area fraction) of the boxes ``erase(i)`` returns as (h, w) for draws i."""
    shapes = np.array([erase(i) for i in range(draws)], dtype=np.float64)
    return shapes[:, 0] / shapes[:, 1], shapes[:, 0] * shapes[:, 1] / (EH * EW)


@pytest.mark.parametrize("area", list(RELEASED_ERASING))
def test_released_erasing_mode_matches_the_released_box_statistics(area):
    from dist_reid.data.augment import ReleasedRandomErasing

    module = ReleasedRandomErasing(1.0, area, (9.0, 9.0, 9.0))

    def erase(seed: int) -> tuple[int, int]:
        torch.manual_seed(seed)
        box = module(torch.zeros(3, EH, EW))[0] == 9.0
        return int(box.any(1).sum()), int(box.any(0).sum())

    ratio, fraction = erased_boxes(erase, 3000)
    mean_ratio, mean_area = RELEASED_ERASING[area]
    assert abs(ratio.mean() - mean_ratio) < 0.06 and abs(fraction.mean() - mean_area) < 0.015
    # the torchvision default draws log-uniform aspects: a visibly different box population
    tv = build_train_transform(
        EH,
        EW,
        "visible",
        AugmentOptions(
            pad=0, flip=False, random_erasing=1.0, erasing_scale=area, erasing_fill=(9.0,) * 3
        ),
    )

    def erase_tv(seed: int) -> tuple[int, int]:
        torch.manual_seed(seed)
        box = tv(Image.new("RGB", (EW, EH)))[0] == 9.0
        return int(box.any(1).sum()), int(box.any(0).sum())

    assert abs(erased_boxes(erase_tv, 1000)[0].mean() - mean_ratio) > 0.2
