"""LLCM on its real layout, with the DEEN reference's query/gallery construction (section 3)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dist_reid.data.datasets.base import (
    VIReIDDataset,
    draw_gallery,
    list_images,
    read_id_line,
    read_list_file,
    require_dir,
)
from dist_reid.data.records import DatasetLayoutError, Modality, Record

LAYOUT = (
    "LLCM/idx/{train_vis,train_nir}.txt ('<relative path> <label>'), LLCM/idx/test_id.txt, "
    "LLCM/test_vis/cam1..cam9/<4-digit id>/*.jpg, LLCM/test_nir/cam{1,2,4..9}/<4-digit id>/*.jpg"
)
VISIBLE_CAMS = tuple(range(1, 10))
INFRARED_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)  # LLCM has no NIR camera 3
TEST_FOLDER = {"visible": "test_vis", "infrared": "test_nir"}
# <id>_c<camera>_s<sequence>_f<frame>_<vis|nir>.jpg, the LLCM file naming
FILE_NAME = re.compile(r"(\d+)_c(\d+)_s\d+_f\d+_(vis|nir)\.\w+$")


class LLCM(VIReIDDataset):
    """LLCM: train from the idx lists, test on sampled galleries over 10 trials.

    ``i2v``: query = every NIR test image, gallery = one random VIS image per (id, camera).
    ``v2i``: query = every VIS test image, gallery = sampled NIR — what the name says. DEEN's
    script instead scores the sampled NIR images against the full VIS set (protocols.md 3.2);
    that variant is ``test_split(..., transposed_v2i=True)``.
    """

    name = "llcm"
    metric_protocol = "llcm"
    settings = ("i2v", "v2i")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        idx = require_dir(self.root / "idx", LAYOUT)
        for modality, cams in (("visible", VISIBLE_CAMS), ("infrared", INFRARED_CAMS)):
            for cam in cams:
                require_dir(self.root / TEST_FOLDER[modality] / f"cam{cam}", LAYOUT)
        self.test_ids = read_id_line(idx / "test_id.txt", LAYOUT)
        self.train = self._read_train(idx / "train_vis.txt", "visible") + self._read_train(
            idx / "train_nir.txt", "infrared"
        )
        leaked = {r.pid for r in self.train} & set(self.test_ids)
        if leaked:
            raise DatasetLayoutError(
                f"{idx}: test ids {sorted(leaked)[:5]} also appear in the training lists"
            )
        self._listing: dict[tuple[str, int, str], list[str]] = {}

    @property
    def trials(self) -> tuple[int, ...]:
        return tuple(range(10))

    def _read_train(self, path: Path, modality: Modality) -> list[Record]:
        records = []
        for image, _label in read_list_file(path, self.root, LAYOUT):
            match = FILE_NAME.search(image)
            if match is None:
                raise DatasetLayoutError(
                    f"{path}: image {image} is not named <id>_c<cam>_s<seq>_f<frame>_<vis|nir>.jpg"
                )
            records.append(Record(image, int(match.group(1)), int(match.group(2)), modality))
        return records

    def _folders(self, modality: Modality) -> list[tuple[int, Path, list[str]]]:
        folder_root = self.root / TEST_FOLDER[modality]
        cams = VISIBLE_CAMS if modality == "visible" else INFRARED_CAMS
        found = []
        for padded in sorted(f"{pid:04d}" for pid in self.test_ids):
            for cam in cams:
                folder = folder_root / f"cam{cam}" / padded
                key = (modality, cam, padded)
                if key not in self._listing:
                    self._listing[key] = list_images(folder) if folder.is_dir() else []
                if self._listing[key]:
                    found.append((cam, folder, self._listing[key]))
        return found

    def all_test(self, modality: Modality) -> list[Record]:
        """Every test image of one modality: ids sorted, cameras in order, files sorted."""
        return [
            Record(str(folder / name), int(folder.name), cam, modality)
            for cam, folder, names in self._folders(modality)
            for name in names
        ]

    def sampled_test(self, modality: Modality, trial: int, multi_shot: bool = False) -> list[Record]:
        self._check_trial(trial)
        folders = self._folders(modality)
        paths = draw_gallery([(folder, names) for _, folder, names in folders], trial, multi_shot)
        return [
            Record(str(p), int(p.parent.name), int(p.parent.parent.name[3:]), modality) for p in paths
        ]

    def test_split(
        self,
        trial: int = 0,
        direction: str = "i2v",
        multi_shot: bool = False,
        transposed_v2i: bool = False,
    ) -> tuple[list[Record], list[Record]]:
        """(query, gallery) of one trial in one direction."""
        self._check_setting(direction)
        if direction == "i2v":
            return self.all_test("infrared"), self.sampled_test("visible", trial, multi_shot)
        if transposed_v2i:
            return self.sampled_test("infrared", trial, multi_shot), self.all_test("visible")
        return self.all_test("visible"), self.sampled_test("infrared", trial, multi_shot)

    def split(self, setting: str, trial: int, **options: bool) -> tuple[list[Record], list[Record]]:
        return self.test_split(
            trial=trial,
            direction=setting,
            multi_shot=options.get("multi_shot", False),
            transposed_v2i=options.get("transposed_v2i", False),
        )
