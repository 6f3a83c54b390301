"""Shared pieces of the dataset readers: layout checks, listings, the protocol interface."""

from __future__ import annotations

import abc
import os
import random
from collections.abc import Sequence
from pathlib import Path

from dist_reid.data.records import DatasetLayoutError, Record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MULTI_SHOT_IMAGES = 10  # the official multi-shot protocol: 10 images per (identity, camera)


def require_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}; expected layout: {expected}")
    return path


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}; expected layout: {expected}")
    return path


def read_id_line(path: Path, expected: str) -> list[int]:
    """Read a one-line comma-separated id file (SYSU-MM01 ``exp/*_id.txt``, LLCM ``test_id.txt``)."""
    text = require_file(path, expected).read_text().strip()
    if not text:
        raise DatasetLayoutError(f"{path} is empty; expected one line of comma-separated ids")
    first_line = text.splitlines()[0]
    ids: list[int] = []
    for token in first_line.split(","):
        token = token.strip()
        if not token:
            continue
        try:
            ids.append(int(token))
        except ValueError:
            raise DatasetLayoutError(
                f"{path}: {token!r} is not an integer id; expected one line of comma-separated ids"
            ) from None
    return ids


def list_images(folder: Path) -> list[str]:
    """Sorted file names of an identity folder; anything that is not an image is an error.

    The reference lists every entry, so a stray file (e.g. ``Thumbs.db``) would enter a gallery
    draw and break its path parsing (protocols.md pitfall 12): refuse it instead of skipping it.
    """
    names = sorted(os.listdir(folder))
    for name in names:
        if not name.lower().endswith(IMAGE_SUFFIXES) or not (folder / name).is_file():
            raise DatasetLayoutError(
                f"{folder / name}: not an image file; identity folders may only hold images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
    if not names:
        raise DatasetLayoutError(f"{folder} is an empty identity folder")
    return names


def read_list_file(path: Path, root: Path, expected: str) -> list[tuple[str, int]]:
    """Read ``<relative path> <integer label>`` lines, checking that every image exists."""
    entries: list[tuple[str, int]] = []
    for number, line in enumerate(require_file(path, expected).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DatasetLayoutError(
                f"{path}:{number}: expected '<relative path> <label>', got {line!r}"
            )
        rel, label = parts
        try:
            value = int(label)
        except ValueError:
            raise DatasetLayoutError(f"{path}:{number}: label {label!r} is not an integer") from None
        if not (root / rel).is_file():
            raise DatasetLayoutError(f"{path}:{number}: image {root / rel} does not exist")
        entries.append((str(root / rel), value))
    if not entries:
        raise DatasetLayoutError(f"{path} lists no images")
    return entries


def draw_gallery(
    folders: Sequence[tuple[Path, list[str]]], trial: int, multi_shot: bool
) -> list[Path]:
    """The reference's per-trial gallery draw: one ``choice`` per (identity, camera) folder.

    ``random.Random(trial)`` reproduces the reference's ``random.seed(trial)`` stream without
    touching global state. Multi-shot (an option; the community code has single-shot only)
    draws up to 10 distinct images per folder with ``sample``, in drawn order.
    """
    rng = random.Random(trial)
    picks: list[Path] = []
    for folder, names in folders:
        if multi_shot:
            chosen = rng.sample(names, min(MULTI_SHOT_IMAGES, len(names)))
        else:
            chosen = [rng.choice(names)]
        picks.extend(folder / name for name in chosen)
    return picks


class VIReIDDataset(abc.ABC):
    """A visible-infrared ReID dataset: training records plus its test protocol."""

    name: str
    metric_protocol: str  # which rule set of dist_reid.evaluation.metrics applies
    settings: tuple[str, ...]  # protocol settings (search modes or directions)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"dataset root {self.root} does not exist or is not a folder")
        self.train: list[Record] = []

    @property
    @abc.abstractmethod
    def trials(self) -> tuple[int, ...]:
        """The trial numbers of the full protocol."""

    @abc.abstractmethod
    def split(self, setting: str, trial: int, **options: bool) -> tuple[list[Record], list[Record]]:
        """(query, gallery) of one protocol setting and trial."""

    def scored_trials(self) -> tuple[int, ...]:
        """The trials a model trained on this dataset object is scored on: all of them (one
        training set serves every trial). RegDB overrides it: each trial has its own split."""
        return self.trials

    @property
    def num_train_ids(self) -> int:
        return len({r.pid for r in self.train})

    def train_labels(self) -> dict[int, int]:
        """Dataset identity -> contiguous class index 0..C-1 in ascending identity order."""
        return {pid: label for label, pid in enumerate(sorted({r.pid for r in self.train}))}

    def _check_setting(self, setting: str) -> None:
        if setting not in self.settings:
            raise ValueError(f"{self.name}: unknown setting {setting!r}; choose from {self.settings}")

    def _check_trial(self, trial: int) -> None:
        if trial not in self.trials:
            raise ValueError(f"{self.name}: trial {trial} is outside {self.trials}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, train={len(self.train)} images)"
