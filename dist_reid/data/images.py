"""A map-style dataset over records that decodes files with PIL (no pixels held in memory)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dist_reid.data.records import Record


class ImageDecodeError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` as 3-channel RGB (IR JPEGs and thermal BMPs included)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from None
    except Image.DecompressionBombError as exc:
        # A header claiming more than 2 x Image.MAX_IMAGE_PIXELS: refused before any pixel is
        # read; a bad file like any other (skip_corrupt replaces it).
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from None


class RecordImageDataset(Dataset):
    """``dataset[i]`` -> (transformed image, i)."""

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.records[index].path)), index
