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


def header_errors(paths: Sequence[str], limit: int = 3) -> tuple[list[str], int]:
    """Open each file's header only (no pixels decoded: cheap enough for a whole test split)
    and return up to ``limit`` ``"<path>: <reason>"`` lines and the number of bad files. A file
    whose header reads but whose data is truncated is found only when decoded."""
    bad: list[str] = []
    count = 0
    for path in paths:
        try:
            with Image.open(path):
                continue
        except FileNotFoundError:
            reason = "not found"
        except Image.DecompressionBombError as exc:
            reason = str(exc)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            reason = str(exc).replace(f"{path!r}", "").replace(str(path), "").strip(" :") or (
                type(exc).__name__
            )
        count += 1
        if len(bad) < limit:
            bad.append(f"{path}: {reason}")
    return bad, count


class RecordImageDataset(Dataset):
    """``dataset[i]`` -> (transformed image, i)."""

    def __init__(
        self, records: Sequence[Record], transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.records[index].path)), index
