"""Hostile image files: one ImageDecodeError naming the file, and skip_corrupt replaces them."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_reid.data.augment import AugmentOptions
from dist_reid.data.images import ImageDecodeError, load_rgb
from dist_reid.data.pipeline.torch_loader import TrainImages
from dist_reid.data.records import Record


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side x side RGB pixels (about 60 bytes on disk): PIL refuses
    it in ``Image.open`` because side**2 is over twice ``Image.MAX_IMAGE_PIXELS``."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_header_is_an_image_decode_error_naming_the_file(tmp_path):
    assert 2 * Image.MAX_IMAGE_PIXELS < 30000**2  # else PIL would only warn
    bomb = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageDecodeError, match=r"bomb\.png") as excinfo:
        load_rgb(str(bomb))
    assert "\n" not in str(excinfo.value)


def test_skip_corrupt_replaces_a_decompression_bomb_with_the_same_identity(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 8, 3), 200, np.uint8)).save(good)
    bomb = _bomb_png(tmp_path / "bomb.png")
    records = [Record(str(bomb), 3, 1, "visible"), Record(str(good), 3, 1, "visible")]
    labels = {3: 0}
    strict = TrainImages(records, labels, 16, 8, AugmentOptions(), skip_corrupt=False)
    with pytest.raises(ImageDecodeError, match=r"bomb\.png"):
        strict._load(0, seed=0)
    lenient = TrainImages(records, labels, 16, 8, AugmentOptions(), skip_corrupt=True)
    image, used = lenient._load(0, seed=0)
    assert used == 1 and image.size == (8, 16) and lenient.skipped == 1
