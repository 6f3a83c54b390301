"""SYSU-MM01 on its real layout (protocols.md section 1)."""

from __future__ import annotations

import os
from pathlib import Path

from dist_reid.data.datasets.base import (
    VIReIDDataset,
    draw_gallery,
    list_images,
    read_id_line,
    require_dir,
)
from dist_reid.data.records import DatasetLayoutError, Modality, Record

LAYOUT = (
    "SYSU-MM01/cam1..cam6/<4-digit id>/<images>, SYSU-MM01/exp/{train,val,test}_id.txt "
    "(one line of comma-separated ids)"
)
VISIBLE_CAMS = (1, 2, 4, 5)
INFRARED_CAMS = (3, 6)
GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}


class SYSUMM01(VIReIDDataset):
    """SYSU-MM01: train on train+val ids (395 in the real set), test on the test ids.

    Query = every infrared image of the test ids (ids sorted, cam3 then cam6, files sorted);
    gallery = one random visible image per (test id, camera) per trial, drawn as the reference.
    """

    name = "sysu"
    metric_protocol = "sysu"
    settings = ("all", "indoor")

    def __init__(self, root: str | os.PathLike[str], *, include_val: bool = True) -> None:
        super().__init__(root)
        for cam in (*VISIBLE_CAMS, *INFRARED_CAMS):
            require_dir(self.root / f"cam{cam}", LAYOUT)
        exp = require_dir(self.root / "exp", LAYOUT)
        self.train_ids = read_id_line(exp / "train_id.txt", LAYOUT)
        self.val_ids = read_id_line(exp / "val_id.txt", LAYOUT)
        self.test_ids = read_id_line(exp / "test_id.txt", LAYOUT)
        overlap = set(self.train_ids + self.val_ids) & set(self.test_ids)
        if overlap:
            raise DatasetLayoutError(
                f"{exp}: ids {sorted(overlap)[:5]} are in both the training and the test split"
            )
        self._listing: dict[tuple[int, str], list[str]] = {}
        train_ids = self.train_ids + self.val_ids if include_val else self.train_ids
        self.train = self._collect(train_ids, VISIBLE_CAMS, "visible") + self._collect(
            train_ids, INFRARED_CAMS, "infrared"
        )
        for pid in train_ids:
            modalities = {r.modality for r in self.train if r.pid == pid}
            if modalities != {"visible", "infrared"}:
                missing = {"visible", "infrared"} - modalities
                raise DatasetLayoutError(
                    f"{self.root}: training identity {pid:04d} has no {'/'.join(sorted(missing))} "
                    "images; every training identity needs both modalities"
                )

    @property
    def trials(self) -> tuple[int, ...]:
        return tuple(range(10))

    def _folders(self, ids: list[int], cams: tuple[int, ...]) -> list[tuple[int, Path, list[str]]]:
        """Existing (camera, id) folders in the reference's walk order: ids sorted, cams fixed."""
        found = []
        for padded in sorted(f"{pid:04d}" for pid in ids):
            for cam in cams:
                folder = self.root / f"cam{cam}" / padded
                key = (cam, padded)
                if key not in self._listing:
                    self._listing[key] = list_images(folder) if folder.is_dir() else []
                if self._listing[key]:
                    found.append((cam, folder, self._listing[key]))
        return found

    def _collect(self, ids: list[int], cams: tuple[int, ...], modality: Modality) -> list[Record]:
        return [
            Record(str(folder / name), int(folder.name), cam, modality)
            for cam, folder, names in self._folders(ids, cams)
            for name in names
        ]

    def query(self) -> list[Record]:
        """Every infrared test image (identical for both search modes)."""
        return self._collect(self.test_ids, INFRARED_CAMS, "infrared")

    def gallery(self, trial: int, mode: str = "all", multi_shot: bool = False) -> list[Record]:
        self._check_trial(trial)
        self._check_setting(mode)
        folders = self._folders(self.test_ids, GALLERY_CAMS[mode])
        paths = draw_gallery([(folder, names) for _, folder, names in folders], trial, multi_shot)
        return [Record(str(p), int(p.parent.name), int(p.parent.parent.name[3:]), "visible") for p in paths]

    def test_split(
        self, trial: int = 0, mode: str = "all", multi_shot: bool = False
    ) -> tuple[list[Record], list[Record]]:
        """(query, gallery) of one trial of all-search (``mode="all"``) or indoor-search."""
        return self.query(), self.gallery(trial, mode, multi_shot)

    def split(self, setting: str, trial: int, **options: bool) -> tuple[list[Record], list[Record]]:
        return self.test_split(trial=trial, mode=setting, multi_shot=options.get("multi_shot", False))
