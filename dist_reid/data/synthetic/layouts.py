"""Write synthetic SYSU-MM01 / RegDB / LLCM trees in exactly the real layouts.

The pixels come from :mod:`dist_reid.data.synthetic.render`; this module decides which identity
appears in which camera, how many images each (identity, camera) has, file names, split files and
camera profiles. Each image's randomness is derived from ``(seed, pid, cam, index)`` so the output
is deterministic for a seed and independent of generation order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_reid.data.synthetic.render import CameraProfile, render_image, sample_identity

LAYOUTS = ("sysu", "regdb", "llcm")
DEFAULT_IMAGES_PER_CAMERA = {"sysu": 6, "regdb": 10, "llcm": 6}

SYSU_CAMERAS = {
    1: CameraProfile(1, "visible", (256, 112), contrast=1.0, brightness=0.02, scene="indoor"),
    2: CameraProfile(2, "visible", (240, 104), contrast=0.9, brightness=-0.02, scene="indoor"),
    3: CameraProfile(
        3, "infrared", (192, 80), contrast=0.8, noise_std=0.03, blur=0.8, scene="indoor"
    ),
    4: CameraProfile(4, "visible", (288, 128), contrast=1.1, brightness=0.05, scene="outdoor"),
    5: CameraProfile(5, "visible", (272, 120), contrast=1.05, brightness=0.0, scene="outdoor"),
    6: CameraProfile(
        6, "infrared", (176, 72), contrast=0.7, noise_std=0.04, blur=1.0, scene="night"
    ),
}
REGDB_CAMERAS = {
    "visible": CameraProfile(1, "visible", (128, 64), contrast=1.0, blur=0.6, scene="outdoor"),
    "infrared": CameraProfile(
        2, "infrared", (128, 64), contrast=0.75, noise_std=0.03, blur=1.2, scene="night"
    ),
}
# LLCM: low-light day/night cameras; camera k is the same physical camera in both modalities.
LLCM_VISIBLE = {
    cam: CameraProfile(
        cam,
        "visible",
        (256, 104),
        contrast=0.7 + 0.05 * (cam % 4),
        brightness=-0.15 + 0.03 * (cam % 5),
        noise_std=0.04,
        blur=0.8,
        scene="night" if cam % 3 == 0 else "outdoor",
    )
    for cam in range(1, 10)
}
LLCM_INFRARED = {
    cam: CameraProfile(
        cam, "infrared", (224, 92), contrast=0.75, noise_std=0.04, blur=1.0, scene="night"
    )
    for cam in (1, 2, 4, 5, 6, 7, 8, 9)
}


MANIFEST = "synthetic.json"  # the generator's arguments, written at the tree's root


class SyntheticError(ValueError):
    """Bad arguments to the generator (the message names the argument)."""


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The arguments a synthetic tree at ``root`` was generated with (None: no manifest, e.g.
    real data or a tree written before manifests existed)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SyntheticError(f"{path}: unreadable synthetic manifest ({exc})") from None


def manifest_mismatch(
    root: str | os.PathLike[str],
    layout: str,
    num_ids: int,
    seed: int,
    images_per_camera: int | None,
) -> str | None:
    """A one-line explanation when the tree at ``root`` was generated with other arguments than
    these (None when they match or the tree has no manifest)."""
    found = read_manifest(root)
    if found is None:
        return None
    wanted = _manifest(layout, num_ids, seed, images_per_camera)
    diffs = [f"{k}={found.get(k)!r} (asked: {v!r})" for k, v in wanted.items() if found.get(k) != v]
    if not diffs:
        return None
    return f"{Path(root) / MANIFEST}: the synthetic tree at {root} was generated with " + ", ".join(
        diffs
    )


def _manifest(layout: str, num_ids: int, seed: int, images_per_camera: int | None) -> dict:
    """What :func:`generate` records in ``synthetic.json`` (and what a config is compared with)."""
    per_camera = images_per_camera or DEFAULT_IMAGES_PER_CAMERA.get(layout)
    return {"layout": layout, "num_ids": num_ids, "seed": seed, "images_per_camera": per_camera}


@dataclass
class SynthSummary:
    """What was generated, for logs and for tests that read the tree back."""

    layout: str
    root: str
    seed: int
    num_ids: int
    splits: dict[str, list[int]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # "<split>/<modality>" -> count
    cams: dict[str, list[int]] = field(default_factory=dict)  # "<split>/<modality>" -> cameras used
    seconds: float = 0.0

    def add(self, split: str, modality: str, cam: int, count: int = 1) -> None:
        key = f"{split}/{modality}"
        self.images[key] = self.images.get(key, 0) + count
        cams = self.cams.setdefault(key, [])
        if cam not in cams:
            cams.append(cam)
            cams.sort()


def _image_rng(seed: int, pid: int, cam: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, pid, cam, index])


def _split_ids(
    ids: list[int], fractions: tuple[float, ...], rng: np.random.Generator
) -> list[list[int]]:
    """Shuffle ``ids`` and cut them by ``fractions`` (each part at least 1 id, sorted)."""
    order = list(rng.permutation(ids))
    sizes = [max(1, round(f * len(ids))) for f in fractions]
    parts, start = [], 0
    for size in sizes:
        parts.append(sorted(int(i) for i in order[start : start + size]))
        start += size
    parts.append(sorted(int(i) for i in order[start:]))
    return parts


def _camera_subset(rng: np.random.Generator, cams: tuple[int, ...], p: float) -> list[int]:
    """Each camera sees the identity with probability p; at least one camera always does."""
    chosen = [cam for cam in cams if rng.random() < p]
    return chosen or [int(rng.choice(cams))]


def _count(rng: np.random.Generator, per_camera: int) -> int:
    low = max(1, per_camera // 2)
    return int(rng.integers(low, per_camera + per_camera // 2 + 1))


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bmp":
        image.save(path, format="BMP")
    else:
        image.save(path, format="JPEG", quality=90)


def _write_sysu(
    root: Path, summary: SynthSummary, per_camera: int, progress: Callable[[int], None]
) -> None:
    rng = np.random.default_rng([summary.seed, 0x5_15])
    ids = list(range(1, summary.num_ids + 1))
    test, val, train = _split_ids(ids, (0.2, 0.2), rng)
    summary.splits = {"train": train, "val": val, "test": test}
    for cam in SYSU_CAMERAS:
        (root / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    exp = root / "exp"
    exp.mkdir(parents=True, exist_ok=True)
    for name, part in (
        ("train_id", train),
        ("val_id", val),
        ("test_id", test),
        ("available_id", ids),
    ):
        (exp / f"{name}.txt").write_text(",".join(str(i) for i in part) + "\n")
    split_of = {pid: "test" if pid in test else "train" for pid in ids}
    for pid in ids:
        identity = sample_identity(pid, summary.seed)
        cams = _camera_subset(rng, (1, 2, 4, 5), 0.7) + _camera_subset(rng, (3, 6), 0.75)
        for cam in sorted(cams):
            camera = SYSU_CAMERAS[cam]
            for index in range(_count(rng, per_camera)):
                image = render_image(identity, camera, _image_rng(summary.seed, pid, cam, index))
                _save(image, root / f"cam{cam}" / f"{pid:04d}" / f"{index + 1:04d}.jpg")
                summary.add(split_of[pid], camera.modality, cam)
                progress(1)


def _write_regdb(
    root: Path, summary: SynthSummary, per_camera: int, progress: Callable[[int], None]
) -> None:
    rng = np.random.default_rng([summary.seed, 0xDB])
    ids = list(range(1, summary.num_ids + 1))
    folder = {"visible": "Visible", "infrared": "Thermal"}
    tag = {"visible": "v", "infrared": "t"}
    files: dict[tuple[int, str], list[str]] = {}
    for pid in ids:
        identity = sample_identity(pid, summary.seed)
        sex = "female" if rng.random() < 0.5 else "male"
        view = ("front", "back")[int(rng.integers(2))]
        serial = int(rng.integers(0, 100000))
        for modality, camera in REGDB_CAMERAS.items():
            names = []
            for index in range(per_camera):
                name = f"{sex}_{view}_{tag[modality]}_{serial:05d}_{index + 1}.bmp"
                image = render_image(
                    identity, camera, _image_rng(summary.seed, pid, camera.cam, index)
                )
                _save(image, root / folder[modality] / str(pid) / name)
                names.append(f"{folder[modality]}/{pid}/{name}")
                summary.add("all", modality, camera.cam)
                progress(1)
            files[(pid, modality)] = names
    idx = root / "idx"
    idx.mkdir(parents=True, exist_ok=True)
    n_train = len(ids) // 2
    for trial in range(1, 11):
        shuffled = list(np.random.default_rng([summary.seed, trial]).permutation(ids))
        train = sorted(int(i) for i in shuffled[:n_train])
        test = sorted(int(i) for i in shuffled[n_train:])
        summary.splits[f"train_{trial}"] = train
        summary.splits[f"test_{trial}"] = test
        for modality, list_name in (("visible", "visible"), ("infrared", "thermal")):
            # Training labels are class indices 0..C-1; test labels keep the identity number.
            train_lines = [
                f"{p} {label}" for label, pid in enumerate(train) for p in files[(pid, modality)]
            ]
            test_lines = [f"{p} {pid}" for pid in test for p in files[(pid, modality)]]
            (idx / f"train_{list_name}_{trial}.txt").write_text("\n".join(train_lines) + "\n")
            (idx / f"test_{list_name}_{trial}.txt").write_text("\n".join(test_lines) + "\n")


def _write_llcm(
    root: Path, summary: SynthSummary, per_camera: int, progress: Callable[[int], None]
) -> None:
    rng = np.random.default_rng([summary.seed, 0x11C])
    ids = list(range(1, summary.num_ids + 1))
    test, train = _split_ids(ids, (351 / 1064,), rng)
    summary.splits = {"train": train, "test": test}
    for cam in LLCM_VISIBLE:
        (root / "test_vis" / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    for cam in LLCM_INFRARED:
        (root / "test_nir" / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    idx = root / "idx"
    idx.mkdir(parents=True, exist_ok=True)
    (idx / "test_id.txt").write_text(",".join(str(i) for i in test) + "\n")
    label_of = {pid: label for label, pid in enumerate(train)}
    lists: dict[str, list[str]] = {"visible": [], "infrared": []}
    suffix = {"visible": "vis", "infrared": "nir"}
    for pid in ids:
        identity = sample_identity(pid, summary.seed)
        split = "test" if pid in test else "train"
        for modality, cameras, p in (
            ("visible", LLCM_VISIBLE, 0.45),
            ("infrared", LLCM_INFRARED, 0.45),
        ):
            for cam in sorted(_camera_subset(rng, tuple(cameras), p)):
                sequence = int(rng.integers(100000, 240000))
                for index in range(_count(rng, per_camera)):
                    name = f"{pid:04d}_c{cam:02d}_s{sequence:06d}_f{1000 + 10 * index:04d}_{suffix[modality]}.jpg"
                    image = render_image(
                        identity,
                        cameras[cam],
                        _image_rng(summary.seed, pid, 100 * cam + (modality == "infrared"), index),
                    )
                    if split == "test":
                        rel = f"test_{suffix[modality]}/cam{cam}/{pid:04d}/{name}"
                    else:
                        rel = f"{suffix[modality]}/{pid:04d}/{name}"
                        lists[modality].append(f"{rel} {label_of[pid]}")
                    _save(image, root / rel)
                    summary.add(split, modality, cam)
                    progress(1)
    (idx / "train_vis.txt").write_text("\n".join(lists["visible"]) + "\n")
    (idx / "train_nir.txt").write_text("\n".join(lists["infrared"]) + "\n")


WRITERS = {"sysu": _write_sysu, "regdb": _write_regdb, "llcm": _write_llcm}


def generate(
    layout: str,
    root: str | os.PathLike[str],
    num_ids: int,
    seed: int = 0,
    images_per_camera: int | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic dataset tree of ``layout`` at ``root``.

    The tree is built in ``<root>.partial`` and moved into place at the end, so an interrupted
    run never leaves a half-written dataset where a reader would take it for a whole one. An
    existing ``root`` is an error unless ``overwrite`` is set.
    """
    if layout not in WRITERS:
        raise SyntheticError(f"layout {layout!r} is not one of {LAYOUTS}")
    minimum = 4 if layout != "regdb" else 2
    if num_ids < minimum:
        raise SyntheticError(f"num_ids must be >= {minimum} for {layout}, got {num_ids}")
    per_camera = images_per_camera or DEFAULT_IMAGES_PER_CAMERA[layout]
    if per_camera < 1:
        raise SyntheticError(f"images_per_camera must be >= 1, got {per_camera}")
    root = Path(root)
    occupied = any(root.iterdir()) if root.is_dir() else root.exists()
    if occupied and not overwrite:
        raise SyntheticError(
            f"{root} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    summary = SynthSummary(layout=layout, root=str(root), seed=seed, num_ids=num_ids)
    start = time.perf_counter()
    WRITERS[layout](partial, summary, per_camera, progress or (lambda n: None))
    manifest = _manifest(layout, num_ids, seed, per_camera)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    summary.seconds = time.perf_counter() - start
    if root.exists():
        shutil.rmtree(root)
    os.replace(partial, root)
    return summary
